//! Extractors whose rejections are the contract's errors, not axum's plain-text ones.

use super::serve::BodyTimedOut;
use crate::error::Error;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap};
use http_body_util::LengthLimitError;
use serde::de::DeserializeOwned;
use tollgate_contract::ErrorCode;

/// The largest request body accepted (413 above).
pub const BODY_LIMIT: usize = 1024 * 1024;

/// A JSON body; malformed JSON, missing fields, wrong types and unknown fields answer 400 with `param`.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        json_content_type(req.headers())?;
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|rejection| body_read_error(&rejection))?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// A JSON body that may be left out: an empty body (or `null`) is `T::default()` (`POST
/// /admin/accounts/{id}/keys` with or without a spend limit).
pub struct OptionalJsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalJsonBody<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let headers = req.headers().clone();
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|rejection| body_read_error(&rejection))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJsonBody(T::default()));
        }
        json_content_type(&headers)?;
        // `null` says "no body" in JSON.
        if bytes.trim_ascii() == b"null" {
            return Ok(OptionalJsonBody(T::default()));
        }
        parse_json(&bytes).map(OptionalJsonBody)
    }
}

/// A body is read as JSON only when it says it is: `application/json` or another `…/…+json`
/// type, or no `Content-Type` at all (the one lenience, for the clients that send none). Anything
/// else (`text/plain`, curl's default `application/x-www-form-urlencoded`) is 415.
pub fn json_content_type(headers: &HeaderMap) -> Result<(), Error> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let essence = value
        .to_str()
        .ok()
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase());
    let is_json = essence.as_deref().is_some_and(|mime| {
        mime == "application/json"
            || mime
                .split_once('/')
                .is_some_and(|(_, subtype)| subtype.ends_with("+json"))
    });
    if is_json {
        return Ok(());
    }
    let sent: String = essence
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(80)
        .collect();
    Err(Error::InvalidRequest {
        code: ErrorCode::UnsupportedMediaType,
        message: format!(
            "The request body must be JSON sent as `Content-Type: application/json`, not `{sent}`; \
             with curl, use --json or -H 'Content-Type: application/json'."
        ),
        param: Some("Content-Type".to_owned()),
    })
}

/// Why a request body could not be read, from the error of reading it (see [`body_fault`]);
/// 400 when it is neither too slow nor too large (the client broke off, or sent a malformed
/// chunked body).
pub fn body_read_error(error: &(dyn std::error::Error + 'static)) -> Error {
    body_fault(error).unwrap_or_else(|| Error::InvalidRequest {
        code: ErrorCode::InvalidJson,
        message: "The request body could not be read.".to_owned(),
        param: None,
    })
}

/// 408 when the body did not arrive within `--body-read-timeout` (`serve::BodyTimedOut`),
/// 413 when it is above [`BODY_LIMIT`], found anywhere in the error's chain of causes.
pub fn body_fault(error: &(dyn std::error::Error + 'static)) -> Option<Error> {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if is::<BodyTimedOut>(e) {
            return Some(Error::InvalidRequest {
                code: ErrorCode::RequestTimeout,
                message: "The request body did not arrive in time, so nothing was done; send the request again."
                    .to_owned(),
                param: None,
            });
        }
        if is::<LengthLimitError>(e) {
            return Some(body_too_large());
        }
        cause = e.source();
    }
    None
}

pub fn body_too_large() -> Error {
    Error::InvalidRequest {
        code: ErrorCode::BodyTooLarge,
        message: format!(
            "The request body is larger than {} MiB; send a smaller one.",
            BODY_LIMIT / (1024 * 1024)
        ),
        param: None,
    }
}

/// Parses JSON into `T`, naming the offending field in the error.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(Error::InvalidRequest {
            code: ErrorCode::InvalidJson,
            message: "The request body is empty; send a JSON object.".to_owned(),
            param: None,
        });
    }
    // serde would read a struct from an array, field by field; the API takes objects only.
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') && serde_json::from_slice::<serde_json::Value>(bytes).is_ok() {
        return Err(Error::InvalidRequest {
            code: ErrorCode::InvalidValue,
            message: "The request body must be a JSON object.".to_owned(),
            param: None,
        });
    }
    let deserializer = &mut serde_json::Deserializer::from_slice(bytes);
    let err = match serde_path_to_error::deserialize(deserializer) {
        Ok(parsed) => return Ok(parsed),
        Err(err) => err,
    };
    // Refused data may be a whole number written as a float; a bad request pays for the retry.
    if err.inner().classify() == serde_json::error::Category::Data {
        if let Some(parsed) = with_integral_floats(bytes) {
            return Ok(parsed);
        }
    }
    Err(describe(err))
}

/// The envelope of a body serde refused: which field, and what is wrong with it.
fn describe(err: serde_path_to_error::Error<serde_json::Error>) -> Error {
    let path = err.path().to_string();
    let inner = err.into_inner();
    let text = strip_position(&inner.to_string());
    if inner.classify() != serde_json::error::Category::Data {
        return Error::InvalidRequest {
            code: ErrorCode::InvalidJson,
            message: format!("The request body is not valid JSON: {text}."),
            param: None,
        };
    }
    let join = |field: &str| {
        if path == "." {
            field.to_owned()
        } else {
            format!("{path}.{field}")
        }
    };
    // serde_json says that it is a data error (`classify`), and serde_path_to_error where;
    // which data error is only in the text: serde_json formats serde's `missing_field` and
    // `unknown_field` into its message (serde's own default wording, the same in every
    // version) and keeps no kind of its own.
    if let Some(field) = quoted(&text, "missing field `") {
        let param = join(field);
        return Error::InvalidRequest {
            code: ErrorCode::MissingField,
            message: format!("`{param}` is required."),
            param: Some(param),
        };
    }
    if let Some(field) = quoted(&text, "unknown field `") {
        // Here the path already ends with the unknown field itself.
        let param = if path == "." {
            field.to_owned()
        } else {
            path.clone()
        };
        return Error::InvalidRequest {
            code: ErrorCode::UnknownField,
            message: format!("`{param}` is not a field of this request ({text})."),
            param: Some(param),
        };
    }
    if path == "." {
        return Error::InvalidRequest {
            code: ErrorCode::InvalidValue,
            message: format!(
                "The request body must be a JSON object of the documented shape ({text})."
            ),
            param: None,
        };
    }
    Error::InvalidRequest {
        code: ErrorCode::InvalidValue,
        message: format!("`{path}` has the wrong type or value: {text}."),
        param: Some(path),
    }
}

/// JSON Schema counts `2.0` as the integer 2, and so do clients that write every number as a
/// float (Python's `2.0`, JavaScript arithmetic): the body again, with every float that is
/// exactly an integer (up to 2^53, where floats stop being exact) read as that integer.
/// Only tried after serde refused a float, so the common body is parsed once.
fn with_integral_floats<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    fn integral(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Number(n) if n.is_f64() => {
                if let Some(f) = n.as_f64() {
                    let exact = f.fract() == 0.0 && f.abs() <= (1u64 << 53) as f64;
                    if exact {
                        // In range and whole: the conversion is exact.
                        *value = serde_json::Value::from(f as i64);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(integral),
            serde_json::Value::Object(fields) => fields.values_mut().for_each(integral),
            _ => {}
        }
    }
    let mut value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    integral(&mut value);
    serde_json::from_value(value).ok()
}

/// serde_json appends " at line 1 column 9": useful to a parser, noise in a message.
fn strip_position(text: &str) -> String {
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_owned(),
        None => text.to_owned(),
    }
}

fn quoted<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = text.strip_prefix(prefix)?;
    rest.split('`').next()
}

/// What the `Authorization` header holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential<'a> {
    /// No header, or `Bearer` with nothing after it.
    Missing,
    /// `Bearer <credential>`.
    Bearer(&'a str),
    /// Another scheme (`Basic …`), or a credential that is not text.
    Unsupported,
}

/// Whether `error` is a `T`, or a `T` in a box of its own (axum's extractors box
/// `LengthLimitError` once more when they rewrap it).
fn is<T: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> bool {
    error.is::<T>() || error.is::<Box<T>>()
}

/// Reads `Authorization: Bearer <credential>` (the first such header). Bytes to the end, as this
/// runs on every API request: a value with bytes above ASCII is `Unsupported` when its
/// credential is not UTF-8, and otherwise a credential that no key or token can match.
pub fn bearer(headers: &HeaderMap) -> Credential<'_> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Credential::Missing;
    };
    let value = trim_blanks(value.as_bytes());
    let (scheme, credential) = match value.iter().position(|&b| b == b' ') {
        Some(at) => (&value[..at], &value[at + 1..]),
        None => (value, &[][..]),
    };
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Credential::Unsupported;
    }
    match std::str::from_utf8(trim_blanks(credential)) {
        Ok("") => Credential::Missing,
        Ok(credential) => Credential::Bearer(credential),
        Err(_) => Credential::Unsupported,
    }
}

/// Without leading and trailing spaces and tabs (the only whitespace a header value can hold).
fn trim_blanks(mut bytes: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = bytes {
        bytes = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = bytes {
        bytes = rest;
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_contract::CreateGenerationRequest;

    fn err(body: &str) -> (ErrorCode, Option<String>) {
        match parse_json::<CreateGenerationRequest>(body.as_bytes()) {
            Err(Error::InvalidRequest { code, param, .. }) => (code, param),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn classifies_json_errors() {
        assert_eq!(err("{\"prompt\": "), (ErrorCode::InvalidJson, None));
        assert_eq!(err("not json"), (ErrorCode::InvalidJson, None));
        assert_eq!(err(""), (ErrorCode::InvalidJson, None));
        assert_eq!(err("{}"), (ErrorCode::MissingField, Some("prompt".into())));
        assert_eq!(
            err(r#"{"prompt":"x","n":"two"}"#),
            (ErrorCode::InvalidValue, Some("n".into()))
        );
        assert_eq!(
            err(r#"{"prompt":"x","n":300}"#),
            (ErrorCode::InvalidValue, Some("n".into()))
        );
        assert_eq!(
            err(r#"{"prompt":"x","size":"300x300"}"#),
            (ErrorCode::InvalidValue, Some("size".into()))
        );
        assert_eq!(
            err(r#"{"prompt":"x","sise":"512x512"}"#),
            (ErrorCode::UnknownField, Some("sise".into()))
        );
        assert_eq!(err("[1,2]"), (ErrorCode::InvalidValue, None));
    }

    #[test]
    fn nested_paths() {
        let e = parse_json::<tollgate_contract::CreateAccountRequest>(
            br#"{"name":"a","rate_limit":{"requests_per_minute":1}}"#,
        );
        match e {
            Err(Error::InvalidRequest { code, param, .. }) => {
                assert_eq!(code, ErrorCode::MissingField);
                assert_eq!(param.as_deref(), Some("rate_limit.burst"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bearer_parsing() {
        use axum::http::HeaderValue;
        assert_eq!(bearer(&HeaderMap::new()), Credential::Missing);
        let cases: [(&[u8], Credential); 8] = [
            (b"Bearer tg_abc", Credential::Bearer("tg_abc")),
            (b"bearer   ", Credential::Missing),
            (b"Bearer", Credential::Missing),
            (b"Basic dXNlcg==", Credential::Unsupported),
            (b" BEARER  tg_abc\t", Credential::Bearer("tg_abc")),
            (b"Bearer\ttg_abc", Credential::Unsupported),
            (b"Bearertg_abc", Credential::Unsupported),
            (b"Bearer tg_\xff", Credential::Unsupported),
        ];
        for (value, expected) in cases {
            let mut h = HeaderMap::new();
            h.insert(
                header::AUTHORIZATION,
                HeaderValue::from_bytes(value).unwrap(),
            );
            assert_eq!(bearer(&h), expected, "{:?}", String::from_utf8_lossy(value));
        }
    }
}
