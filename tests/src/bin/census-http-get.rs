//! `census-http-get URL`: one plain HTTP/1.1 GET (`http://HOST:PORT/PATH`), for tests that read
//! an HTTP endpoint inside a lab namespace (the daemons' `/metrics`), where the test process
//! itself cannot connect and the lab has no HTTP client of its own. Prints the response as
//! received (status line, headers, body) on stdout; exits 0 for status 200, 1 otherwise or on
//! any error (said in one line on stderr). Gives up after 10 seconds.

use std::{
    io::{Read as _, Write as _},
    net::{TcpStream, ToSocketAddrs as _},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context, Result, bail};

const TIMEOUT: Duration = Duration::from_secs(10);

fn get(url: &str) -> Result<(u16, Vec<u8>)> {
    let rest = url
        .strip_prefix("http://")
        .context("the URL must start with http://")?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let addr = authority
        .to_socket_addrs()
        .with_context(|| format!("resolving {authority}"))?
        .next()
        .with_context(|| format!("{authority} has no address"))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, TIMEOUT).with_context(|| format!("connecting {addr}"))?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    write!(
        stream,
        "GET /{path} HTTP/1.1\r\nHost: {authority}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .context("reading the response")?;
    let status_line = response
        .split(|&b| b == b'\n')
        .next()
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    let Some(status) = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
    else {
        bail!("not an HTTP response: {status_line:?}");
    };
    Ok((status, response))
}

fn main() -> ExitCode {
    let Some(url) = std::env::args().nth(1) else {
        eprintln!("census-http-get: usage: census-http-get http://HOST:PORT/PATH");
        return ExitCode::from(2);
    };
    match get(&url) {
        Ok((status, response)) => {
            let _ = std::io::stdout().write_all(&response);
            if status == 200 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("census-http-get: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
