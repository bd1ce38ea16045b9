//! TLS client configuration shared by the MQTT and ComfyUI connections: rustls with the ring provider, the
//! Mozilla roots (or a private CA), and an optional client certificate.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// Why a TLS configuration could not be built; names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read or holds no usable PEM item.
    #[error("cannot use `{path}`: {reason}")]
    File {
        /// The configured path.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// Only one of the client certificate and key is set.
    #[error("a client certificate needs both a certificate file and a key file")]
    HalfClientAuth,
    /// rustls refused the combination.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
}

fn file_error(path: &str, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File { path: path.to_string(), reason: reason.to_string() }
}

/// A client configuration: trust `ca_file` (PEM) only when given, else the Mozilla roots; present the client
/// certificate chain `cert_file` with `key_file` when both are given.
pub fn client_config(
    ca_file: Option<&str>,
    cert_file: Option<&str>,
    key_file: Option<&str>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(ca_file) => {
            for cert in certificates(ca_file)? {
                roots.add(cert).map_err(|e| file_error(ca_file, e))?;
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions()?;
    let builder = builder.with_root_certificates(roots);
    let config = match (cert_file, key_file) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert_file), Some(key_file)) => {
            let key = PrivateKeyDer::from_pem_file(Path::new(key_file)).map_err(|e| file_error(key_file, e))?;
            builder.with_client_auth_cert(certificates(cert_file)?, key)?
        }
        _ => return Err(TlsError::HalfClientAuth),
    };
    Ok(Arc::new(config))
}

fn certificates(path: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(Path::new(path))
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate in it"));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_are_named_and_defaults_work() {
        assert!(client_config(None, None, None).is_ok(), "public roots, no client certificate");
        let err = client_config(Some("/nonexistent/ca.pem"), None, None).expect_err("missing CA");
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not pem").expect("write");
        let err = client_config(empty.to_str(), None, None).expect_err("no cert");
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
        assert!(matches!(client_config(None, Some("cert.pem"), None), Err(TlsError::HalfClientAuth)));
    }
}
