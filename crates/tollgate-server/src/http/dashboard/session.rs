//! Cookies, the session extractors and CSRF-checked forms of the dashboard.
//!
//! - [`AccountPage`] / [`OperatorPage`] / [`AnyPage`]: the session of the request, looked up on
//!   every request (so a revoked key or an expired session is noticed at once). Without one, a
//!   page redirects (303) to the sign-in page, which brings the visitor back afterwards.
//! - [`CsrfForm`]: a form body whose `csrf` field must be the session's token; anything else is
//!   the JSON 403 `csrf_token_invalid`. It can only be extracted after a session extractor, so a
//!   handler that takes a form cannot forget the check.
//! - Cookies are `HttpOnly; SameSite=Strict; Path=/dashboard`, and `Secure` when the request
//!   came over TLS (as a proxy tells with `X-Forwarded-Proto: https` or `Forwarded: proto=https`).

use crate::domain::sessions::{DashboardSession, Viewer};
use crate::error::Error;
use crate::http::AppState;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use tollgate_contract::ErrorCode;

/// The session cookie: a random token whose hash names the session in the store.
pub const SESSION_COOKIE: &str = "tollgate_session";
/// Before sign-in: the double-submit token of the sign-in form.
pub const SIGN_IN_COOKIE: &str = "tollgate_signin";
/// A one-time message for the next page (after a redirect).
pub const FLASH_COOKIE: &str = "tollgate_flash";
/// Where the cookies are sent.
pub const COOKIE_PATH: &str = "/dashboard";

/// The value of cookie `name`, if the request carries it.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.trim_matches('"'))
}

/// Whether the browser reached us over TLS (through a proxy that terminates it).
/// Made once: a `&str` name is parsed again on every lookup, and this runs on every request.
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

pub fn is_https(headers: &HeaderMap) -> bool {
    let forwarded_proto = headers
        .get(&X_FORWARDED_PROTO)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"));
    let forwarded = headers
        .get(header::FORWARDED)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .is_some_and(|v| {
            v.split(';')
                .filter_map(|kv| kv.trim().split_once('='))
                .any(|(k, v)| {
                    k.eq_ignore_ascii_case("proto")
                        && v.trim_matches('"').eq_ignore_ascii_case("https")
                })
        });
    forwarded_proto || forwarded
}

/// A `Set-Cookie` value with the dashboard's flags; `max_age: Some(0)` deletes the cookie.
pub fn set_cookie(name: &str, value: &str, max_age: Option<u64>, https: bool) -> HeaderValue {
    let mut text = format!("{name}={value}; Path={COOKIE_PATH}; HttpOnly; SameSite=Strict");
    if let Some(seconds) = max_age {
        text.push_str(&format!("; Max-Age={seconds}"));
    }
    if https {
        text.push_str("; Secure");
    }
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Appends a `Set-Cookie` to a response.
pub fn with_cookie(mut response: Response, cookie: HeaderValue) -> Response {
    if !cookie.is_empty() {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    response
}

/// `303 See Other` to `location` (a path of ours).
pub fn see_other(location: &str) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// Where a visitor may be sent back after signing in: a dashboard path of ours, nothing else
/// (no other host, no protocol-relative `//…`, no backslashes or control characters).
pub fn safe_next(next: Option<&str>) -> Option<String> {
    let next = next?.trim();
    let ok = (next == COOKIE_PATH || next.starts_with("/dashboard/"))
        && !next.starts_with("//")
        && next.len() <= 512
        && next.bytes().all(|b| b.is_ascii_graphic() && b != b'\\');
    ok.then(|| next.to_owned())
}

/// A flash message, shown once on the page after a redirect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flash {
    pub ok: bool,
    pub text: String,
}

impl Flash {
    pub fn ok(text: impl Into<String>) -> Self {
        Flash {
            ok: true,
            text: text.into(),
        }
    }

    pub fn error(text: impl Into<String>) -> Self {
        Flash {
            ok: false,
            text: text.into(),
        }
    }

    fn encode(&self) -> String {
        let mut out = String::from(if self.ok { "ok:" } else { "error:" });
        for b in self.text.bytes().take(400) {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out
    }

    fn decode(value: &str) -> Option<Flash> {
        let (kind, text) = value.split_once(':')?;
        let mut bytes = Vec::with_capacity(text.len());
        let mut rest = text.as_bytes();
        while let Some((&b, tail)) = rest.split_first() {
            if b == b'%' {
                let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
                bytes.push(u8::from_str_radix(hex, 16).ok()?);
                rest = &tail[2..];
            } else {
                bytes.push(b);
                rest = tail;
            }
        }
        Some(Flash {
            ok: kind == "ok",
            text: String::from_utf8(bytes).ok()?,
        })
    }
}

/// `303` to `location` with a flash message for the page there.
pub fn redirect_with_flash(location: &str, flash: Flash, headers: &HeaderMap) -> Response {
    with_cookie(
        see_other(location),
        set_cookie(FLASH_COOKIE, &flash.encode(), Some(60), is_https(headers)),
    )
}

/// The flash message of the request, if any (see [`take_flash`] to clear it).
pub fn read_flash(headers: &HeaderMap) -> Option<Flash> {
    cookie(headers, FLASH_COOKIE).and_then(Flash::decode)
}

/// Clears the flash cookie on the response of the page that showed it.
pub fn take_flash(response: Response, headers: &HeaderMap) -> Response {
    if cookie(headers, FLASH_COOKIE).is_some() {
        with_cookie(
            response,
            set_cookie(FLASH_COOKIE, "", Some(0), is_https(headers)),
        )
    } else {
        response
    }
}

/// The sign-in page, remembering where to come back to.
fn to_sign_in(parts: &Parts) -> Response {
    let here = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|_| parts.method == axum::http::Method::GET);
    let location = match safe_next(here) {
        Some(next) => format!("/dashboard/sign-in?next={}", encode_query(&next)),
        None => "/dashboard/sign-in".to_owned(),
    };
    let response = see_other(&location);
    if cookie(&parts.headers, SESSION_COOKIE).is_some() {
        // A stale cookie (expired, signed out elsewhere, key revoked): forget it.
        with_cookie(
            response,
            set_cookie(SESSION_COOKIE, "", Some(0), is_https(&parts.headers)),
        )
    } else {
        response
    }
}

/// Percent-encodes a query value.
pub fn encode_query(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn session_of(
    parts: &mut Parts,
    state: &Arc<AppState>,
) -> Result<DashboardSession, Response> {
    let token = cookie(&parts.headers, SESSION_COOKIE).unwrap_or("");
    match state.app.dashboard_session(token).await {
        Ok(Some(session)) => {
            parts.extensions.insert(session.clone());
            Ok(session)
        }
        Ok(None) => Err(to_sign_in(parts)),
        Err(e) => Err(e.into_response()),
    }
}

/// A page for an account holder: their session and account.
pub struct AccountPage {
    pub session: DashboardSession,
    pub account_id: String,
    /// The API key the session was opened with.
    pub key_id: String,
}

impl FromRequestParts<Arc<AppState>> for AccountPage {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let session = session_of(parts, state).await?;
        match &session.viewer {
            Viewer::Account { account_id, key_id } => Ok(AccountPage {
                account_id: account_id.clone(),
                key_id: key_id.clone(),
                session,
            }),
            Viewer::Operator => Err(see_other("/dashboard/admin")),
        }
    }
}

/// A page for the operator.
pub struct OperatorPage {
    pub session: DashboardSession,
}

impl FromRequestParts<Arc<AppState>> for OperatorPage {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let session = session_of(parts, state).await?;
        match session.viewer {
            Viewer::Operator => Ok(OperatorPage { session }),
            Viewer::Account { .. } => Err(see_other("/dashboard/overview")),
        }
    }
}

/// A page for whoever is signed in.
pub struct AnyPage {
    pub session: DashboardSession,
}

impl FromRequestParts<Arc<AppState>> for AnyPage {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        Ok(AnyPage {
            session: session_of(parts, state).await?,
        })
    }
}

#[derive(Deserialize)]
struct WithCsrf<T> {
    #[serde(default)]
    csrf: String,
    #[serde(flatten)]
    form: T,
}

/// A form body (`application/x-www-form-urlencoded`) that carried the session's CSRF token.
/// Take it after [`AccountPage`], [`OperatorPage`] or [`AnyPage`]; its fields are strings, so
/// the handler can answer a bad value in the page rather than with an error.
pub struct CsrfForm<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for CsrfForm<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let Some(session) = req.extensions().get::<DashboardSession>().cloned() else {
            return Err(Error::CsrfTokenInvalid);
        };
        let axum::Form(WithCsrf { csrf, form }) =
            axum::Form::<WithCsrf<T>>::from_request(req, state)
                .await
                .map_err(|rejection| {
                    crate::http::extract::body_fault(&rejection).unwrap_or_else(|| {
                        Error::InvalidRequest {
                            code: ErrorCode::InvalidValue,
                            message: "The form could not be read; reload the page and try again."
                                .to_owned(),
                            param: None,
                        }
                    })
                })?;
        if session.csrf_matches(&csrf) {
            Ok(CsrfForm(form))
        } else {
            Err(Error::CsrfTokenInvalid)
        }
    }
}

/// The address a request came from: the TCP peer (`0.0.0.0` when unknown, as when the router
/// is called directly in a test). Forwarding headers are not trusted: anyone can send them.
pub struct ClientIp(pub IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientIp(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |ConnectInfo(addr)| {
                    addr.ip()
                }),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, "a=1; tollgate_session=abc".parse().unwrap());
        h.append(header::COOKIE, "b=2".parse().unwrap());
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "b"), Some("2"));
        assert_eq!(cookie(&h, "tollgate"), None);
    }

    #[test]
    fn only_our_paths_are_followed_after_sign_in() {
        assert_eq!(
            safe_next(Some("/dashboard/credits")).as_deref(),
            Some("/dashboard/credits")
        );
        for bad in [
            "//evil.example/dashboard/",
            "https://evil.example/",
            "/dashboardx",
            "/dashboard/\\evil",
            "/v1/account",
            "/dashboard/a b",
        ] {
            assert_eq!(safe_next(Some(bad)), None, "{bad}");
        }
    }

    #[test]
    fn flash_round_trips_any_text() {
        let flash = Flash::error("Voucher <b>tgv_1</b>; 50% off — ok?");
        assert_eq!(Flash::decode(&flash.encode()), Some(flash));
        assert_eq!(Flash::decode("ok:%ZZ"), None);
        assert_eq!(Flash::decode("ok:%E"), None);
    }

    #[test]
    fn cookie_flags() {
        let plain = set_cookie(SESSION_COOKIE, "t", Some(60), false);
        assert_eq!(
            plain.to_str().unwrap(),
            "tollgate_session=t; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age=60"
        );
        let tls = set_cookie(SESSION_COOKIE, "t", None, true);
        assert!(tls.to_str().unwrap().ends_with("; Secure"));
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        assert!(is_https(&h));
        let mut h = HeaderMap::new();
        h.insert("forwarded", "for=1.2.3.4;proto=https".parse().unwrap());
        assert!(is_https(&h));
        assert!(!is_https(&HeaderMap::new()));
    }
}
