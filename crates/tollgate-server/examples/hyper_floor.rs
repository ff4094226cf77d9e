//! The floor of the benchmark's HTTP scenarios: a bare hyper server, run exactly as tollgate runs
//! (the same connection loop settings: HTTP/1.1, `TCP_NODELAY`, one tokio worker when
//! `TOKIO_WORKER_THREADS=1`), answering every request with the same fixed bytes and doing nothing
//! else. What it reaches is the most any server on hyper can reach on the machine, so
//! `bench/run` prints tollgate's share of it beside the nginx ratio.
//!
//!     hyper_floor PORT STATUS BODY_FILE [HEADER:VALUE ...]
//!
//! Prints `listening on http://127.0.0.1:PORT` once it accepts connections.
//!
//! `HYPER_FLOOR_SPIN_NS=N` makes it spin N ns of CPU on every request before answering: the
//! sensitivity probe of `bench/run`, which measures how much req/s falls per µs of server work,
//! i.e. whether a cheaper server can show up in req/s at all on this machine.

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::process::ExitCode;

struct Fixed {
    status: http::StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

fn parse_args() -> Result<(u16, Fixed), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [port, status, body_file, headers @ ..] = args.as_slice() else {
        return Err("usage: hyper_floor PORT STATUS BODY_FILE [HEADER:VALUE ...]".into());
    };
    let port = port.parse().map_err(|e| format!("PORT: {e}"))?;
    let status = status
        .parse::<u16>()
        .ok()
        .and_then(|s| http::StatusCode::from_u16(s).ok())
        .ok_or("STATUS: not an HTTP status")?;
    let body = std::fs::read(body_file).map_err(|e| format!("{body_file}: {e}"))?;
    let mut map = http::HeaderMap::new();
    map.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    for header in headers {
        let (name, value) = header
            .split_once(':')
            .ok_or_else(|| format!("{header}: not HEADER:VALUE"))?;
        let name = http::HeaderName::try_from(name.trim()).map_err(|e| format!("{name}: {e}"))?;
        let value =
            http::HeaderValue::try_from(value.trim()).map_err(|e| format!("{value}: {e}"))?;
        map.insert(name, value);
    }
    Ok((
        port,
        Fixed {
            status,
            headers: map,
            body: Bytes::from(body),
        },
    ))
}

/// Burns `spin` of CPU on this thread (a stand-in for a server's own work per request).
fn spin_for(spin: std::time::Duration) {
    let start = std::time::Instant::now();
    while start.elapsed() < spin {
        std::hint::spin_loop();
    }
}

async fn serve(port: u16, fixed: Fixed, spin: std::time::Duration) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on http://{}", listener.local_addr()?);
    let fixed = std::sync::Arc::new(fixed);
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let fixed = std::sync::Arc::clone(&fixed);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |_req| {
                // The plain floor must not pay even the clock read of an empty spin.
                if !spin.is_zero() {
                    spin_for(spin);
                }
                let mut response = http::Response::new(Full::new(fixed.body.clone()));
                *response.status_mut() = fixed.status;
                *response.headers_mut() = fixed.headers.clone();
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn main() -> ExitCode {
    let (port, fixed) = match parse_args() {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("hyper_floor: {e}");
            return ExitCode::FAILURE;
        }
    };
    let spin = match std::env::var("HYPER_FLOOR_SPIN_NS") {
        Err(_) => std::time::Duration::ZERO,
        Ok(ns) => match ns.parse() {
            Ok(ns) => std::time::Duration::from_nanos(ns),
            Err(e) => {
                eprintln!("hyper_floor: HYPER_FLOOR_SPIN_NS: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("hyper_floor: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(port, fixed, spin)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hyper_floor: {e}");
            ExitCode::FAILURE
        }
    }
}
