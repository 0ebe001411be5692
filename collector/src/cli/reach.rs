//! Why `census` could not talk to the collector, from the error chain of tonic, hyper, h2,
//! rustls and the socket: one line saying which file or flag to fix, and the exit code
//! (77 when a certificate is not trusted, 69 when the collector cannot be reached or speaks
//! another protocol than the URL says).

use std::{error::Error, io, path::Path};

use super::{EX_NOPERM, EX_UNAVAILABLE, Failure};

/// What went wrong on the way to the collector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// The collector's certificate is not signed by the CA we trust.
    UntrustedCollector,
    /// The collector's certificate does not name the host in the URL.
    WrongName,
    /// The collector's certificate has expired (or is not valid yet).
    ExpiredCollector,
    /// The collector refused our certificate at the handshake (an alert from it).
    RefusedOurCertificate,
    /// TLS on our side, and no TLS from the collector: it serves plaintext.
    NotTls,
    /// Nothing listens there.
    Refused,
    /// No answer in time.
    TimedOut,
    /// Something else: the chain says what.
    Other,
}

/// Walks `e` and its sources (including what an `io::Error` wraps, which its `source` skips)
/// for the first cause we can name.
pub fn cause(e: &(dyn Error + 'static)) -> Cause {
    let mut current: Option<&(dyn Error + 'static)> = Some(e);
    // Bounded: error chains are a few links long; a cycle would be a bug elsewhere.
    for _ in 0..32 {
        let Some(e) = current else { break };
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return tls_cause(tls);
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            match io.kind() {
                io::ErrorKind::ConnectionRefused => return Cause::Refused,
                io::ErrorKind::TimedOut => return Cause::TimedOut,
                _ => {}
            }
            if let Some(inner) = io.get_ref() {
                current = Some(inner);
                continue;
            }
        }
        current = e.source();
    }
    let text = super::error_chain(e).to_ascii_lowercase();
    if text.contains("timed out") || text.contains("deadline") {
        Cause::TimedOut
    } else {
        Cause::Other
    }
}

fn tls_cause(e: &rustls::Error) -> Cause {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    match e {
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            Cause::WrongName
        }
        E::InvalidCertificate(
            C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. },
        ) => Cause::ExpiredCollector,
        E::InvalidCertificate(_) => Cause::UntrustedCollector,
        E::AlertReceived(
            A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::AccessDenied
            | A::CertificateRequired,
        ) => Cause::RefusedOurCertificate,
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => Cause::NotTls,
        _ => Cause::Other,
    }
}

/// The failure for not reaching the collector at `url` with the credentials in `credentials`
/// (`None`: the `--credentials` directory, unnamed), because of `e`.
pub fn failure(url: &str, credentials: Option<&Path>, e: &(dyn Error + 'static)) -> Failure {
    let chain = super::error_chain(e);
    let plaintext = url.starts_with("http://");
    let (ca, creds) = match credentials {
        Some(dir) => (
            dir.join("ca.pem").display().to_string(),
            dir.display().to_string(),
        ),
        None => (
            "the --credentials directory's ca.pem".to_owned(),
            "the --credentials directory".to_owned(),
        ),
    };
    match cause(e) {
        Cause::UntrustedCollector => Failure::new(
            EX_NOPERM,
            format!(
                "the collector's certificate at {url} is not signed by the CA in {ca}: use the operator credentials of this collector (--credentials <its data dir>/operator, or CENSUS_CREDENTIALS) ({chain})"
            ),
        ),
        Cause::WrongName => Failure::new(
            EX_NOPERM,
            format!(
                "the collector's certificate does not name the host in {url}: use a name it holds in --collector, or add the name to the collector's [tls] names ({chain})"
            ),
        ),
        Cause::ExpiredCollector => Failure::new(
            EX_NOPERM,
            format!(
                "the collector's certificate is expired or not valid yet: check the clocks, and restart the collector to make a new one ({chain})"
            ),
        ),
        Cause::RefusedOurCertificate => Failure::new(
            EX_NOPERM,
            format!(
                "the collector at {url} refused the operator certificate in {creds}: it was made by another collector; use this collector's <data dir>/operator ({chain})"
            ),
        ),
        Cause::NotTls => Failure::new(
            EX_UNAVAILABLE,
            format!(
                "the collector at {url} does not speak TLS (a development-mode collector serves plaintext): use http:// in --collector ({chain})"
            ),
        ),
        Cause::Refused => Failure::new(
            EX_UNAVAILABLE,
            format!(
                "cannot reach the collector at {url}: nothing listens there; is census-collector running, and is this its address? (--collector or CENSUS_COLLECTOR_URL) ({chain})"
            ),
        ),
        Cause::TimedOut => Failure::new(
            EX_UNAVAILABLE,
            format!(
                "the collector at {url} did not answer in time: is the address right and the port open? (--collector, --timeout) ({chain})"
            ),
        ),
        // Plaintext gRPC to a TLS port: the collector drops the connection at once, and h2
        // says no more than that the connection broke.
        Cause::Other if plaintext => Failure::new(
            EX_UNAVAILABLE,
            format!(
                "the collector at {url} did not answer plaintext gRPC: it most likely serves TLS; use https:// in --collector ({chain})"
            ),
        ),
        Cause::Other => Failure::new(
            EX_UNAVAILABLE,
            format!(
                "cannot reach the collector at {url}: {chain}; is census-collector running there? (--collector or CENSUS_COLLECTOR_URL)"
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io_wrapping(e: rustls::Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    /// An error whose source is `inner`, as tonic's and hyper's wrap what they got.
    #[derive(Debug)]
    struct Wrap(&'static str, Box<dyn Error + Send + Sync>);

    impl std::fmt::Display for Wrap {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl Error for Wrap {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(self.1.as_ref())
        }
    }

    #[test]
    fn the_cause_is_found_inside_wrapped_io_errors() {
        let untrusted = Wrap(
            "transport error",
            Box::new(Wrap(
                "client error (Connect)",
                Box::new(io_wrapping(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer,
                ))),
            )),
        );
        assert_eq!(cause(&untrusted), Cause::UntrustedCollector);
        let refused = Wrap(
            "transport error",
            Box::new(io::Error::from(io::ErrorKind::ConnectionRefused)),
        );
        assert_eq!(cause(&refused), Cause::Refused);
        let not_tls = io_wrapping(rustls::Error::InvalidMessage(
            rustls::InvalidMessage::InvalidContentType,
        ));
        assert_eq!(cause(&not_tls), Cause::NotTls);
        let name = io_wrapping(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForName,
        ));
        assert_eq!(cause(&name), Cause::WrongName);
    }

    #[test]
    fn each_failure_is_one_line_naming_what_to_fix() {
        let creds = Some(Path::new("/etc/census/operator"));
        let untrusted = io_wrapping(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ));
        let f = failure("https://c:7400", creds, &untrusted);
        assert_eq!(f.code, EX_NOPERM);
        assert!(
            f.message
                .contains("not signed by the CA in /etc/census/operator/ca.pem")
                && f.message.contains("--credentials"),
            "{}",
            f.message
        );
        let broken = Wrap(
            "transport error",
            Box::new(Wrap("connection reset", "h2".into())),
        );
        let f = failure("http://c:7400", creds, &broken);
        assert_eq!(f.code, EX_UNAVAILABLE);
        assert!(f.message.contains("use https://"), "{}", f.message);
        let f = failure("https://c:7400", creds, &broken);
        assert_eq!(f.code, EX_UNAVAILABLE);
        assert!(!f.message.contains("use https://"), "{}", f.message);
        for f in [
            failure("https://c:7400", creds, &untrusted),
            failure("http://c:7400", creds, &broken),
        ] {
            assert!(!f.message.contains('\n'), "{}", f.message);
        }
    }
}
