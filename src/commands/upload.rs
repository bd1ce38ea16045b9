//! `upload`: a file for ComfyUI's input folder, as JSON (`filename`, `data_base64`) or as the raw bytes of a
//! message on `request/upload/<filename>`.

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use bytes::Bytes;
use serde_json::json;

use super::fields::{invalid, Body};
use super::response::{http_failure, Failure};
use super::{check_size, Applied, Command, Context, Rejected, Request, Spec};
use crate::bus::topics;

/// The longest accepted file or folder name, in bytes (the usual file system limit).
pub const MAX_FILENAME_BYTES: usize = 255;

/// Standard base64 that takes padding or its absence.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The arguments of `upload`.
#[derive(Debug, Clone, PartialEq)]
pub struct Upload {
    /// The file name; passes [`check_filename`].
    pub filename: String,
    /// The file's bytes.
    pub data: Bytes,
    /// `""`, or `/`-separated names that each pass [`check_filename`].
    pub subfolder: String,
    /// Replace an existing file of the same name.
    pub overwrite: bool,
}

impl Spec for Upload {
    const NAME: &'static str = "upload";
    const FIELDS: &'static [&'static str] = &["filename", "data_base64", "subfolder", "overwrite"];

    fn parse(body: &mut Body, max_payload_bytes: usize) -> Result<Self, Failure> {
        let filename = body.required_string("filename")?;
        check_filename(&filename).map_err(|why| invalid("filename", format!("`filename` {why}")))?;
        let encoded = body.string("data_base64")?.ok_or_else(|| body.missing("data_base64"))?;
        let data = BASE64
            .decode(encoded.as_bytes())
            .map_err(|err| invalid("data_base64", format!("`data_base64` is not standard base64: {err}")))?;
        // Decoded data is never longer than its encoding, but the limit is on the file, so say so.
        check_size(data.len(), max_payload_bytes)?;
        let subfolder = body.string("subfolder")?.unwrap_or_default();
        if !subfolder.is_empty() {
            for segment in subfolder.split('/') {
                check_filename(segment)
                    .map_err(|why| invalid("subfolder", format!("`subfolder` has a folder name that {why}")))?;
            }
        }
        let overwrite = body.bool("overwrite")?.unwrap_or(false);
        Ok(Upload { filename, data: Bytes::from(data), subfolder, overwrite })
    }

    fn apply(self, cx: &mut Context<'_>) -> Applied {
        let http = cx.http.clone();
        Applied::call(move || async move {
            let Upload { filename, data, subfolder, overwrite } = self;
            let answer = http.upload_image(&filename, data, &subfolder, overwrite).await.map_err(http_failure)?;
            Ok(json!({ "name": answer["name"], "subfolder": answer["subfolder"], "type": answer["type"] }))
        })
    }
}

/// Parses a raw-bytes upload on `request/upload/<filename>`. `filename_level` is the level as received, escaped
/// per docs/INTERFACE.md §1; the file goes to the top of the input folder and never overwrites.
pub fn parse_raw(filename_level: &str, payload: Bytes, max_payload_bytes: usize) -> Result<Request, Rejected> {
    let reject = |failure| Rejected { id: None, failure };
    check_size(payload.len(), max_payload_bytes).map_err(reject)?;
    let filename = topics::unescape(filename_level).ok_or_else(|| {
        reject(invalid(
            "filename",
            format!("the file name level `{filename_level}` is not a valid escape (`=XX`) of a UTF-8 name"),
        ))
    })?;
    check_filename(&filename).map_err(|why| {
        // `request.upload.cat.png` on NATS arrives as the levels `cat` and `png`.
        let hint = match filename.contains('/') {
            true => " (escape a `.` in the file name as `=2E` on NATS, `request.upload.cat=2Epng`, and a `/` as `=2F`)",
            false => "",
        };
        reject(invalid("filename", format!("the file name {why}{hint}")))
    })?;
    let upload = Upload { filename, data: payload, subfolder: String::new(), overwrite: false };
    Ok(Request { id: None, command: Command::Upload(upload) })
}

/// Checks a file name (or one folder name of a subfolder) so that it can only name an entry inside its folder:
/// non-empty, at most [`MAX_FILENAME_BYTES`], not `.` or `..`, no `/`, `\`, `:` (a drive or stream on Windows) or
/// control character, and no leading or trailing whitespace. The error says what is wrong ("contains `/`").
pub fn check_filename(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".to_owned());
    }
    if name.len() > MAX_FILENAME_BYTES {
        return Err(format!("is longer than {MAX_FILENAME_BYTES} bytes"));
    }
    if name == "." || name == ".." {
        return Err("is `.` or `..`".to_owned());
    }
    if let Some(c) = name.chars().find(|c| matches!(c, '/' | '\\' | ':')) {
        return Err(format!("contains `{c}`"));
    }
    if name.chars().any(char::is_control) {
        return Err("contains a control character".to_owned());
    }
    if name.starts_with(char::is_whitespace) || name.ends_with(char::is_whitespace) {
        return Err("starts or ends with whitespace".to_owned());
    }
    Ok(())
}
