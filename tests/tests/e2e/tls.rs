//! TLS set up wrong, as a newcomer does it, with the real binaries in the lab: `census` with
//! another collector's credentials, with `http://` against the TLS port, with `https://`
//! against a development-mode (plaintext) collector, and against a port nothing listens on,
//! each ends with one line naming what to fix and exit 77 or 69; and the collector logs the
//! handshakes it refused, one line per address and kind a minute however often they come,
//! and counts every one in its metrics.

use std::process::Output;

use anyhow::{Result, ensure};
use census_tests::{
    lab::{Lab, lab_skipped},
    support::{self, Collector},
};

fn one_line(out: &Output) -> String {
    let errors = support::error_lines(out);
    assert_eq!(errors.len(), 1, "one error line: {out:?}");
    errors[0].clone()
}

#[test]
fn census_says_which_file_or_flag_to_fix_and_the_collector_logs_refused_handshakes() -> Result<()> {
    if lab_skipped() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let listen = format!("{}:0", lab.collector_ip());
    let ours = Collector::start_with_args(
        &lab,
        &lab.dir().join("ours"),
        &["--metrics-listen", &listen],
    )?;
    let other = Collector::start(&lab, &lab.dir().join("other"))?;
    ours.census_ok(["agents"])?;

    // Another collector's credentials: its CA did not sign ours. 77, naming the CA file.
    let creds = other.credentials();
    for _ in 0..3 {
        let out = ours.census_as(&ours.url(), &creds, ["agents"])?;
        assert_eq!(out.status.code(), Some(77), "{out:?}");
        let line = one_line(&out);
        let ca = creds.join("ca.pem");
        assert!(
            line.contains(&format!("not signed by the CA in {}", ca.display()))
                && line.contains("--credentials"),
            "{line}"
        );
    }

    // http:// against the TLS port: 69, saying to use https://.
    let plain = format!("http://{}", ours.addr());
    for _ in 0..3 {
        let out = ours.census_as(&plain, &ours.credentials(), ["agents"])?;
        assert_eq!(out.status.code(), Some(69), "{out:?}");
        let line = one_line(&out);
        assert!(line.contains("use https://"), "{line}");
    }

    // https:// against a development-mode collector, which serves plaintext: 69, use http://.
    let dev = Collector::start_with_args(&lab, &lab.dir().join("dev"), &["--dev-plaintext"])?;
    let out = dev.census_as(&dev.url(), &dev.credentials(), ["agents"])?;
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    let line = one_line(&out);
    assert!(line.contains("use http://"), "{line}");

    // Nothing listening there: 69, saying so.
    let nowhere = format!("https://{}:9", lab.collector_ip());
    let out = ours.census_as(&nowhere, &ours.credentials(), ["agents"])?;
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    assert!(one_line(&out).contains("nothing listens there"), "{out:?}");

    // The collector logged each kind of refused handshake once (three of each came within a
    // minute from one address), and counted all of them.
    let log = ours.proc().log();
    let refused = |reason: &str| {
        log.lines()
            .filter(|l| l.contains("TLS handshake failed") && l.contains(reason))
            .count()
    };
    ensure!(
        refused("untrusted_server_certificate") == 1 && refused("not_tls") == 1,
        "one line per kind and address; the collector's log:\n{log}"
    );
    ensure!(
        log.lines()
            .any(|l| l.contains("untrusted_server_certificate") && l.contains("ca.pem")),
        "the line says what to do:\n{log}"
    );
    let page = ours.metrics()?;
    let failed = |reason: &str| {
        page.sample(&format!(
            "census_collector_tls_handshakes_failed_total{{reason=\"{reason}\"}}"
        ))
    };
    assert_eq!(failed("untrusted_server_certificate"), Some(3.0));
    assert_eq!(failed("not_tls"), Some(3.0));
    // And it still serves the right credentials.
    ours.census_ok(["agents"])?;
    Ok(())
}
