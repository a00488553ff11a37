//! `cyber-inference healthcheck`: asks a running supervisor's `GET /health` whether it is up and exits 0
//! (200 OK) or 1 (anything else), so container images need no curl: Docker's `HEALTHCHECK` and the compose
//! files run the binary itself. `/health` is always open (no login), so a check keeps working when an admin
//! password is set — the fault of the original Cyber-Inference's health check.

use std::time::Duration;

use crate::config::Settings;

/// Command-line arguments of `cyber-inference healthcheck`.
#[derive(Debug, Clone, clap::Args)]
pub struct HealthcheckArgs {
    /// URL to GET. Default: `http://HOST:PORT/health` from the settings, with a wildcard HOST
    /// (`0.0.0.0`, `::`) replaced by the matching loopback address.
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// Seconds to wait for connecting and for the whole answer.
    #[arg(long, value_name = "SECONDS", default_value_t = 3.0)]
    pub timeout: f64,
}

/// Why a health check did not pass. Every variant makes the command exit 1.
#[derive(Debug, thiserror::Error)]
pub enum HealthcheckError {
    /// The URL given with `--url` (or built from HOST/PORT) is not an `http(s)://host[:port]/…` URL.
    #[error("invalid health-check URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    /// `--timeout` is not a positive, finite number of seconds.
    #[error("invalid --timeout {0}: must be a positive number of seconds")]
    InvalidTimeout(f64),
    /// Nothing answered: connection refused, timed out, reset, or not HTTP.
    #[error("GET {url} failed: {reason}")]
    Unreachable { url: String, reason: String },
    /// The server answered with a status other than 200 (e.g. 503 while starting, or a redirect).
    #[error("GET {url} answered {status}, not 200 OK")]
    Unhealthy { url: String, status: u16 },
    /// The HTTP client or its runtime could not be created.
    #[error("cannot start the HTTP client: {0}")]
    Client(String),
}

/// The URL `healthcheck` asks when no `--url` is given: `http://HOST:PORT/health` from `settings`.
///
/// A wildcard listen address cannot be connected to, so `0.0.0.0` becomes `127.0.0.1` and `::` becomes
/// `::1` (written `[::1]`); any other HOST (a specific address or `localhost`) is used as it is.
pub(crate) fn default_url(settings: &Settings) -> String {
    let host = match settings.host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) if ip.is_unspecified() => "127.0.0.1".to_string(),
        Ok(std::net::IpAddr::V6(ip)) if ip.is_unspecified() => "[::1]".to_string(),
        Ok(std::net::IpAddr::V6(ip)) => format!("[{ip}]"),
        _ => settings.host.clone(),
    };
    format!("http://{host}:{}/health", settings.port)
}

/// Checks `url` syntactically: an absolute `http` or `https` URL with a host.
///
/// Errors: [`HealthcheckError::InvalidUrl`] saying what is wrong.
pub(crate) fn parse_url(url: &str) -> Result<reqwest::Url, HealthcheckError> {
    let bad = |reason: String| HealthcheckError::InvalidUrl {
        url: url.to_string(),
        reason,
    };
    let parsed = reqwest::Url::parse(url).map_err(|e| bad(e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad(format!(
            "scheme `{}` is not http or https",
            parsed.scheme()
        )));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host".into()));
    }
    Ok(parsed)
}

/// GETs `url` once, without following redirects or using a proxy, and waits at most `timeout` for the
/// connection and the whole answer. Returns `Ok(())` only for status 200.
///
/// Errors: [`HealthcheckError::InvalidUrl`], [`HealthcheckError::Unreachable`] (refused, timed out, not
/// HTTP), [`HealthcheckError::Unhealthy`] (any status but 200), [`HealthcheckError::Client`].
pub(crate) fn check(url: &str, timeout: Duration) -> Result<(), HealthcheckError> {
    let parsed = parse_url(url)?;
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(timeout)
        .timeout(timeout)
        .build()
        .map_err(|e| HealthcheckError::Client(error_chain(&e)))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| HealthcheckError::Client(e.to_string()))?;
    let status = runtime.block_on(async {
        let response = client.get(parsed).send().await?;
        let status = response.status();
        // Read the body too, so a server that stalls mid-answer counts as unhealthy (bounded by `timeout`).
        response.bytes().await?;
        Ok::<_, reqwest::Error>(status)
    });
    match status {
        Ok(s) if s == reqwest::StatusCode::OK => Ok(()),
        Ok(s) => Err(HealthcheckError::Unhealthy {
            url: url.to_string(),
            status: s.as_u16(),
        }),
        Err(e) => Err(HealthcheckError::Unreachable {
            url: url.to_string(),
            reason: if e.is_timeout() {
                format!("no answer within {:.1} s", timeout.as_secs_f64())
            } else {
                error_chain(&e)
            },
        }),
    }
}

/// Runs `cyber-inference healthcheck`: checks `--url` (or [`default_url`]) and prints one line on stdout
/// when healthy. The caller maps an error to exit status 1.
///
/// Errors: as [`check`], plus [`HealthcheckError::InvalidTimeout`].
pub fn run(args: &HealthcheckArgs, settings: &Settings) -> Result<(), HealthcheckError> {
    let timeout = Duration::try_from_secs_f64(args.timeout)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or(HealthcheckError::InvalidTimeout(args.timeout))?;
    let url = args.url.clone().unwrap_or_else(|| default_url(settings));
    check(&url, timeout)?;
    println!("healthy: GET {url} answered 200 OK");
    Ok(())
}

/// An error and its sources on one line (reqwest's top-level message alone hides the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(host: &str, port: u16) -> Settings {
        Settings {
            host: host.into(),
            port,
            ..Settings::default()
        }
    }

    #[test]
    fn default_url_maps_wildcards_to_loopback() {
        assert_eq!(
            default_url(&settings("0.0.0.0", 8337)),
            "http://127.0.0.1:8337/health"
        );
        assert_eq!(
            default_url(&settings("::", 9000)),
            "http://[::1]:9000/health"
        );
        assert_eq!(
            default_url(&settings("127.0.0.1", 8337)),
            "http://127.0.0.1:8337/health"
        );
        assert_eq!(
            default_url(&settings("192.168.1.20", 80)),
            "http://192.168.1.20:80/health"
        );
        assert_eq!(
            default_url(&settings("fe80::1", 8337)),
            "http://[fe80::1]:8337/health"
        );
        assert_eq!(
            default_url(&settings("localhost", 8337)),
            "http://localhost:8337/health"
        );
        for h in ["0.0.0.0", "::", "127.0.0.1", "fe80::1", "localhost"] {
            parse_url(&default_url(&settings(h, 1))).unwrap();
        }
    }

    #[test]
    fn bad_urls_and_timeouts_are_typed_errors() {
        for url in ["", "127.0.0.1:8337/health", "ftp://host/health", "http://"] {
            let e = parse_url(url).unwrap_err();
            assert!(
                matches!(e, HealthcheckError::InvalidUrl { .. }),
                "{url}: {e}"
            );
        }
        let s = settings("127.0.0.1", 8337);
        for t in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let args = HealthcheckArgs {
                url: None,
                timeout: t,
            };
            assert!(matches!(
                run(&args, &s),
                Err(HealthcheckError::InvalidTimeout(_))
            ));
        }
    }

    #[test]
    fn nothing_listening_is_unreachable() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let e = check(
            &format!("http://127.0.0.1:{port}/health"),
            Duration::from_secs(2),
        )
        .unwrap_err();
        assert!(matches!(e, HealthcheckError::Unreachable { .. }), "{e}");
        assert!(e.to_string().contains(&port.to_string()), "{e}");
    }
}
