//! Trust anchors for TLS clients, from PEM files: a CA bundle a setting names, or
//! the system's bundle (`SSL_CERT_FILE`, else the usual places).
//!
//! Used by the worker towards HTTPS apps (`[upstream] tls_ca`) and by the OTLP
//! exporter towards an `https://` collector (`otlp_ca_file`). Only reads files; the
//! environment is read through a lookup the caller passes, so tests need not change
//! the process's environment.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;

/// The environment variable that names the system CA bundle (as OpenSSL reads it).
pub const SSL_CERT_FILE: &str = "SSL_CERT_FILE";

/// Where the system's CA bundle usually is (Debian/Ubuntu, RHEL, Alpine/macOS-like),
/// in the order tried.
pub const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// Why trust anchors could not be loaded; names the setting and the file.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RootsError(pub String);

/// Which certificates of a bundle are taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchors {
    /// Every block must be valid PEM and a usable trust anchor (a file the operator
    /// named for this purpose).
    Every,
    /// The certificates that can be trust anchors; the others are skipped (a system
    /// bundle may carry some that rustls does not accept).
    Usable,
}

/// Loads the PEM bundle `path` (one or more `CERTIFICATE` blocks) as trust anchors.
/// `what` names the setting in errors (`"[upstream] tls_ca"`); an unreadable file,
/// one without a (usable) certificate, and with [`Anchors::Every`] invalid PEM or a
/// certificate that cannot be an anchor, are errors naming the file.
pub fn load_pem_bundle(
    path: &Path,
    what: &str,
    anchors: Anchors,
) -> Result<RootCertStore, RootsError> {
    let bytes = std::fs::read(path)
        .map_err(|e| RootsError(format!("{what}: cannot read {}: {e}", path.display())))?;
    let mut roots = RootCertStore::empty();
    match anchors {
        Anchors::Every => {
            for c in CertificateDer::pem_slice_iter(&bytes) {
                let c = c.map_err(|e| {
                    RootsError(format!("{what}: {} is not valid PEM: {e}", path.display()))
                })?;
                roots.add(c).map_err(|e| {
                    RootsError(format!(
                        "{what}: a certificate in {} cannot be a trust anchor: {e}",
                        path.display()
                    ))
                })?;
            }
            if roots.is_empty() {
                return Err(RootsError(format!(
                    "{what}: {} holds no CERTIFICATE block",
                    path.display()
                )));
            }
        }
        Anchors::Usable => {
            if add_usable(&mut roots, &bytes) == 0 {
                return Err(RootsError(format!(
                    "{what}: {} holds no CERTIFICATE block usable as a trust anchor",
                    path.display()
                )));
            }
        }
    }
    Ok(roots)
}

/// Adds the certificates of the PEM text `pem` that can be trust anchors to `roots`,
/// skipping the rest; returns how many were added.
pub fn add_usable(roots: &mut RootCertStore, pem: &[u8]) -> usize {
    let (added, _skipped) =
        roots.add_parsable_certificates(CertificateDer::pem_slice_iter(pem).filter_map(Result::ok));
    added
}

/// The places of the system bundle in the order a lenient client tries them:
/// `SSL_CERT_FILE` (looked up with `env`) when set, then [`SYSTEM_BUNDLES`].
pub fn system_bundle_candidates(
    env: &dyn Fn(&str) -> Option<OsString>,
) -> impl Iterator<Item = PathBuf> {
    env(SSL_CERT_FILE)
        .map(PathBuf::from)
        .into_iter()
        .chain(SYSTEM_BUNDLES.iter().map(PathBuf::from))
}

/// Loads the system bundle for a client that needs one: the file `SSL_CERT_FILE`
/// names (looked up with `env`) when it is set and not empty, else the first of
/// [`SYSTEM_BUNDLES`] that exists; its usable certificates ([`Anchors::Usable`]).
/// No bundle found, or one that is unreadable or holds no usable certificate, is an
/// error that begins with `what` and names what was tried. Returns the file too.
pub fn load_system_bundle(
    env: &dyn Fn(&str) -> Option<OsString>,
    what: &str,
) -> Result<(PathBuf, RootCertStore), RootsError> {
    load_system_bundle_in(env, SYSTEM_BUNDLES, what)
}

/// [`load_system_bundle`] with the usual places given.
fn load_system_bundle_in(
    env: &dyn Fn(&str) -> Option<OsString>,
    usual: &[&str],
    what: &str,
) -> Result<(PathBuf, RootCertStore), RootsError> {
    if let Some(path) = env(SSL_CERT_FILE).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        let roots = load_pem_bundle(&path, &format!("{what} ({SSL_CERT_FILE})"), Anchors::Usable)?;
        return Ok((path, roots));
    }
    let Some(path) = usual.iter().map(Path::new).find(|p| p.exists()) else {
        return Err(RootsError(format!(
            "{what}: none found ({SSL_CERT_FILE} is not set; none of {} exists)",
            usual.join(", ")
        )));
    };
    let roots = load_pem_bundle(path, what, Anchors::Usable)?;
    Ok((path.to_path_buf(), roots))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<OsString> {
        None
    }

    #[test]
    fn no_bundle_anywhere_names_what_was_tried() {
        let e = load_system_bundle_in(&no_env, &["/nonexistent/a.pem", "/nonexistent/b.crt"], "x")
            .expect_err("nothing to load");
        let e = e.to_string();
        assert!(e.starts_with("x: none found"), "{e}");
        assert!(
            e.contains("SSL_CERT_FILE is not set")
                && e.contains("/nonexistent/a.pem, /nonexistent/b.crt"),
            "{e}"
        );
        // An empty SSL_CERT_FILE counts as unset.
        let empty = |_: &str| Some(OsString::new());
        let e = load_system_bundle_in(&empty, &["/nonexistent/a.pem"], "x").expect_err("none");
        assert!(e.to_string().contains("SSL_CERT_FILE is not set"), "{e}");
    }

    #[test]
    fn ssl_cert_file_is_taken_as_it_is_and_must_hold_a_certificate() {
        let dir = tempfile::tempdir().expect("dir");
        let missing = dir.path().join("missing.pem");
        let env = |k: &str| (k == SSL_CERT_FILE).then(|| missing.clone().into_os_string());
        // Set: no fallback to the usual places, even when one exists.
        let existing = dir.path().join("other.pem");
        std::fs::write(&existing, "").expect("write");
        let usual = [existing.to_str().expect("utf-8")];
        let e = load_system_bundle_in(&env, &usual, "x").expect_err("unreadable");
        let e = e.to_string();
        assert!(
            e.starts_with("x (SSL_CERT_FILE): cannot read") && e.contains("missing.pem"),
            "{e}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").expect("write");
        let env = |k: &str| (k == SSL_CERT_FILE).then(|| empty.clone().into_os_string());
        let e = load_system_bundle_in(&env, &usual, "x").expect_err("no certificate");
        assert!(
            e.to_string()
                .contains("empty.pem holds no CERTIFICATE block"),
            "{e}"
        );
        // Not set: the first usual place that exists, which must hold a certificate.
        let e = load_system_bundle_in(&no_env, &["/nonexistent/a.pem", usual[0]], "x")
            .expect_err("empty bundle");
        assert!(
            e.to_string().starts_with("x: ") && e.to_string().contains("other.pem holds no"),
            "{e}"
        );
    }

    #[test]
    fn the_lenient_candidates_begin_with_ssl_cert_file() {
        let env = |k: &str| (k == SSL_CERT_FILE).then(|| OsString::from("/a/b.pem"));
        let got: Vec<PathBuf> = system_bundle_candidates(&env).collect();
        assert_eq!(got[0], Path::new("/a/b.pem"));
        assert_eq!(
            got[1..],
            SYSTEM_BUNDLES.iter().map(PathBuf::from).collect::<Vec<_>>()
        );
        assert_eq!(
            system_bundle_candidates(&no_env).count(),
            SYSTEM_BUNDLES.len()
        );
    }

    #[test]
    fn the_usual_bundle_of_this_machine_loads_when_there_is_one() {
        match load_system_bundle(&no_env, "x") {
            Ok((path, roots)) => {
                assert!(
                    SYSTEM_BUNDLES.iter().any(|p| Path::new(p) == path),
                    "{path:?}"
                );
                assert!(!roots.is_empty());
            }
            Err(e) => assert!(
                SYSTEM_BUNDLES.iter().all(|p| !Path::new(p).exists()),
                "a usual bundle exists but: {e}"
            ),
        }
    }

    #[test]
    fn strict_and_lenient_loads_of_a_file_without_certificates() {
        let dir = tempfile::tempdir().expect("dir");
        let junk = dir.path().join("junk.pem");
        std::fs::write(
            &junk,
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let e = load_pem_bundle(&junk, "[s] ca", Anchors::Every).expect_err("invalid PEM");
        assert!(e.to_string().starts_with("[s] ca: "), "{e}");
        assert!(e.to_string().contains("junk.pem"), "{e}");
        let e = load_pem_bundle(&junk, "[s] ca", Anchors::Usable).expect_err("nothing usable");
        assert!(
            e.to_string()
                .contains("junk.pem holds no CERTIFICATE block"),
            "{e}"
        );
    }
}
