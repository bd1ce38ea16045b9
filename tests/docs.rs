//! The source comments that cite `docs/INTERFACE.md` or `docs/PROTOCOL.md` by section point at headings that
//! exist, so a reader who follows a reference lands on the text it means.

use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The section numbers of a document's headings: `## 2. Events` gives `2`, `### 2.3 Feature…` gives `2.3`.
fn sections(doc: &str) -> Vec<String> {
    let text = std::fs::read_to_string(Path::new(ROOT).join("docs").join(doc)).expect("the document exists");
    text.lines()
        .filter(|l| l.starts_with('#'))
        .filter_map(|l| l.trim_start_matches('#').split_whitespace().next().map(|n| n.trim_end_matches('.').into()))
        .filter(|n: &String| n.starts_with(|c: char| c.is_ascii_digit()))
        .collect()
}

/// `(file:line, document, section)` for every `docs/<DOC> §<n>` cited in the sources.
fn citations() -> Vec<(String, String, String)> {
    let mut files = Vec::new();
    sources(&Path::new(ROOT).join("src"), &mut files);
    sources(&Path::new(ROOT).join("sim/src"), &mut files);
    let mut found = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("readable source");
        for (i, line) in text.lines().enumerate() {
            for doc in ["INTERFACE.md", "PROTOCOL.md"] {
                for (at, _) in line.match_indices(doc) {
                    let rest = &line[at + doc.len()..];
                    assert!(line[..at].ends_with("docs/"), "{}:{}: cite it as docs/{doc}", file.display(), i + 1);
                    // Each `§n` after the name, up to the end of the parenthesis or sentence.
                    let cited = rest.split([')', ':']).next().unwrap_or_default();
                    for part in cited.split('§').skip(1) {
                        let n: String = part.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
                        let n = n.trim_end_matches('.').to_string();
                        found.push((format!("{}:{}", file.display(), i + 1), doc.to_string(), n));
                    }
                }
            }
        }
    }
    found
}

#[test]
fn every_cited_section_is_a_heading_of_the_document() {
    let cited = citations();
    assert!(cited.len() >= 20, "the sources cite the documents by section: {cited:?}");
    for (place, doc, section) in cited {
        let headings = sections(&doc);
        assert!(headings.contains(&section), "{place}: docs/{doc} has no section {section:?}; it has {headings:?}");
    }
}
