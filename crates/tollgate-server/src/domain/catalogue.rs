//! The model catalogue: what can be sold, at what price, made by which backend.
//!
//! `--models FILE` is a TOML file (the contract's "Models"); without one there is a single model,
//! [`DEFAULT_MODEL`], made by the backend of `--backend` at the `--prices` of each size. A bad file
//! stops the server at start with the line and the reason: a catalogue is checked whole before
//! anything is sold from it. A provider's key is named by an environment variable, never written
//! in the file.

use crate::config::{BackendKind, Config, Secret};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;
use tollgate_contract::{ImageSize, Model};

/// The one model of a server without a catalogue.
pub const DEFAULT_MODEL: &str = "builtin";

/// The most images one task may ask for (the contract's `n` is 1–4).
const MAX_N: u8 = 4;

/// Every model of the server, and the one a create without `model` gets.
#[derive(Debug, Clone)]
pub struct Catalogue {
    pub default: String,
    /// By id.
    pub models: BTreeMap<String, ModelSpec>,
}

/// One model as configured.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub id: String,
    pub name: String,
    pub backend: BackendSpec,
    /// Credits per image; the sizes the model accepts.
    pub prices: BTreeMap<ImageSize, u64>,
    pub max_n: u8,
    /// Generations of this model in flight at once, per instance (its own slots).
    pub concurrency: usize,
    /// Workers of this model per instance: its `concurrency` (0 with `--workers 0`); without a
    /// catalogue, `--workers`.
    pub workers: usize,
    /// How long one run may take before the task fails and is refunded.
    pub timeout: Duration,
}

/// What makes a model's images, with the provider's settings.
#[derive(Debug, Clone)]
pub enum BackendSpec {
    Builtin,
    /// An OpenAI-compatible images API.
    OpenAi {
        url: String,
        /// Redacted in `Debug`.
        api_key: Secret,
        upstream_model: Option<String>,
    },
    /// Replicate's predictions API.
    Replicate(QueueProvider),
    /// fal's queue API.
    Fal(QueueProvider),
    /// A ComfyUI server and the workflow it runs.
    ComfyUi {
        url: String,
        /// For a proxy in front of ComfyUI; ComfyUI itself has none. Redacted in `Debug`.
        api_key: Option<Secret>,
        /// The workflow in ComfyUI's API format, with `{{prompt}}` and the other placeholders.
        workflow: serde_json::Value,
    },
}

/// The settings of a provider with a queue API (Replicate, fal).
#[derive(Debug, Clone)]
pub struct QueueProvider {
    pub url: String,
    /// Redacted in `Debug`.
    pub api_key: Secret,
    /// The provider's name of the model: `owner/name[:version]` (Replicate), `fal-ai/…` (fal).
    pub upstream_model: String,
    /// Inputs sent with every request, over tollgate's own (`input = { … }` in the file).
    pub input: serde_json::Map<String, serde_json::Value>,
}

impl BackendSpec {
    pub fn name(&self) -> &'static str {
        match self {
            BackendSpec::Builtin => "builtin",
            BackendSpec::OpenAi { .. } => "openai",
            BackendSpec::Replicate(_) => "replicate",
            BackendSpec::Fal(_) => "fal",
            BackendSpec::ComfyUi { .. } => "comfyui",
        }
    }
}

impl ModelSpec {
    /// The cost of `n` images of `size`; `None` when the model does not price `size`.
    pub fn price(&self, size: ImageSize) -> Option<u64> {
        self.prices.get(&size).copied()
    }

    /// The size of a create that names none: the contract's `512x512` when the model sells it,
    /// else the smallest it sells.
    pub fn default_size(&self) -> ImageSize {
        if self.prices.contains_key(&ImageSize::default()) {
            ImageSize::default()
        } else {
            self.prices.keys().next().copied().unwrap_or_default()
        }
    }

    /// As `GET /v1/models` shows it.
    pub fn view(&self) -> Model {
        Model {
            id: self.id.clone(),
            object: "model".to_owned(),
            name: self.name.clone(),
            prices: self.prices.clone(),
            max_n: self.max_n,
        }
    }
}

impl Catalogue {
    /// The catalogue of the file `--models` names, or else the one default model.
    pub fn from_config(config: &Config) -> Result<Catalogue, String> {
        match config.models.as_deref() {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("--models {}: {e}", path.display()))?;
                let dir = path.parent().unwrap_or(std::path::Path::new("."));
                Catalogue::parse(&text, dir, config, |name| std::env::var(name).ok())
                    .map_err(|e| format!("--models {}: {e}", path.display()))
            }
            None => Catalogue::single(config),
        }
    }

    /// The one model of a server without a catalogue, as `--backend` and `--prices` say.
    fn single(config: &Config) -> Result<Catalogue, String> {
        let backend = match config.backend {
            BackendKind::Builtin => BackendSpec::Builtin,
            BackendKind::OpenAi => BackendSpec::OpenAi {
                url: config.upstream_url.clone().ok_or(
                    "--backend openai needs --upstream-url (TOLLGATE_UPSTREAM_URL)".to_owned(),
                )?,
                api_key: config.upstream_api_key.clone().ok_or(
                    "--backend openai needs TOLLGATE_UPSTREAM_API_KEY in the environment"
                        .to_owned(),
                )?,
                upstream_model: config.upstream_model.clone(),
            },
        };
        Ok(Catalogue::of_one(config, backend))
    }

    /// One model, [`DEFAULT_MODEL`], made by the built-in renderer at `--prices`.
    pub fn builtin(config: &Config) -> Catalogue {
        Catalogue::of_one(config, BackendSpec::Builtin)
    }

    fn of_one(config: &Config, backend: BackendSpec) -> Catalogue {
        let name = match &backend {
            BackendSpec::Builtin => "Built-in".to_owned(),
            BackendSpec::OpenAi { upstream_model, .. } => match upstream_model {
                Some(upstream) => format!("{upstream} (OpenAI-compatible)"),
                None => "OpenAI-compatible".to_owned(),
            },
            BackendSpec::Replicate(p) | BackendSpec::Fal(p) => p.upstream_model.clone(),
            BackendSpec::ComfyUi { .. } => "ComfyUI".to_owned(),
        };
        let model = ModelSpec {
            id: DEFAULT_MODEL.to_owned(),
            name,
            backend,
            prices: ImageSize::ALL
                .into_iter()
                .map(|size| (size, config.prices.per_image(size)))
                .collect(),
            max_n: MAX_N,
            concurrency: config.effective_backend_concurrency(),
            workers: config.workers,
            timeout: config.task_timeout,
        };
        Catalogue {
            default: model.id.clone(),
            models: BTreeMap::from([(model.id.clone(), model)]),
        }
    }

    /// Reads a catalogue file. `dir` is where its relative paths start (the file's directory);
    /// `env` looks up the variables that hold providers' keys.
    pub fn parse(
        text: &str,
        dir: &std::path::Path,
        config: &Config,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Catalogue, String> {
        let raw: RawCatalogue = toml::from_str(text).map_err(|e| e.to_string())?;
        // Semantic errors come after the parse: point at the model's table.
        let at = |id: &str, why: String| match line_of(text, id) {
            Some(line) => format!("line {line}, [models.{id}]: {why}"),
            None => format!("[models.{id}]: {why}"),
        };
        if raw.models.is_empty() {
            return Err("the catalogue has no models: add a [models.<id>] table".to_owned());
        }
        let mut models = BTreeMap::new();
        for (id, m) in raw.models {
            if id.is_empty()
                || id.len() > 64
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:/".contains(c))
            {
                return Err(at(
                    &id,
                    "a model id is 1–64 letters, digits or - _ . : /".to_owned(),
                ));
            }
            if m.prices.is_empty() {
                return Err(at(&id, "`prices` names no size".to_owned()));
            }
            let max_n = m.max_n.unwrap_or(MAX_N);
            if !(1..=MAX_N).contains(&max_n) {
                return Err(at(&id, format!("`max_n` must be 1–{MAX_N}")));
            }
            let concurrency = m
                .concurrency
                .unwrap_or_else(|| config.effective_backend_concurrency());
            if concurrency == 0 {
                return Err(at(&id, "`concurrency` must be at least 1".to_owned()));
            }
            let timeout = match &m.timeout {
                Some(t) => {
                    crate::parse_duration(t).map_err(|e| at(&id, format!("`timeout`: {e}")))?
                }
                None => config.task_timeout,
            };
            let key = |backend: &str| -> Result<Secret, String> {
                let var = m.api_key_env.as_deref().ok_or_else(|| {
                    at(
                        &id,
                        format!(
                            "the {backend} backend needs `api_key_env`, the environment variable \
                             that holds the provider's key"
                        ),
                    )
                })?;
                env(var)
                    .filter(|k| !k.is_empty())
                    .map(Secret::new)
                    .ok_or_else(|| at(&id, format!("`api_key_env`: the variable {var} is not set")))
            };
            let url = |backend: &str, default: Option<&str>| -> Result<String, String> {
                let url = m
                    .url
                    .clone()
                    .or(default.map(str::to_owned))
                    .ok_or_else(|| at(&id, format!("the {backend} backend needs `url`")))?;
                match reqwest::Url::parse(&url) {
                    Ok(parsed) if matches!(parsed.scheme(), "http" | "https") => Ok(url),
                    Ok(_) => Err(at(&id, format!("`url` {url:?}: not http:// or https://"))),
                    Err(e) => Err(at(&id, format!("`url` {url:?}: {e}"))),
                }
            };
            let refuse = |backend: &str, fields: &[(&str, bool)]| -> Result<(), String> {
                match fields.iter().find(|(_, set)| *set) {
                    Some((field, _)) => {
                        Err(at(&id, format!("the {backend} backend takes no `{field}`")))
                    }
                    None => Ok(()),
                }
            };
            let input = match &m.input {
                Some(table) => match serde_json::to_value(table) {
                    Ok(serde_json::Value::Object(map)) => map,
                    _ => return Err(at(&id, "`input` must be a table".to_owned())),
                },
                None => serde_json::Map::new(),
            };
            let queue = |backend: &str, default_url: &str| -> Result<QueueProvider, String> {
                Ok(QueueProvider {
                    url: url(backend, Some(default_url))?,
                    api_key: key(backend)?,
                    upstream_model: m.upstream_model.clone().ok_or_else(|| {
                        at(
                            &id,
                            format!("the {backend} backend needs `upstream_model`, the provider's name of the model"),
                        )
                    })?,
                    input: input.clone(),
                })
            };
            let backend = match m.backend {
                RawBackend::Builtin => {
                    refuse(
                        "builtin",
                        &[
                            ("url", m.url.is_some()),
                            ("api_key_env", m.api_key_env.is_some()),
                            ("upstream_model", m.upstream_model.is_some()),
                            ("input", m.input.is_some()),
                        ],
                    )?;
                    BackendSpec::Builtin
                }
                RawBackend::Openai => {
                    refuse("openai", &[("input", m.input.is_some())])?;
                    BackendSpec::OpenAi {
                        url: url("openai", None)?,
                        api_key: key("openai")?,
                        upstream_model: m.upstream_model.clone(),
                    }
                }
                RawBackend::Replicate => {
                    let provider = queue("replicate", "https://api.replicate.com")?;
                    let name = provider
                        .upstream_model
                        .split(':')
                        .next()
                        .unwrap_or_default();
                    if name.split('/').filter(|p| !p.is_empty()).count() != 2 {
                        return Err(at(
                            &id,
                            "`upstream_model`: a Replicate model is owner/name or owner/name:version"
                                .to_owned(),
                        ));
                    }
                    BackendSpec::Replicate(provider)
                }
                RawBackend::Fal => BackendSpec::Fal(queue("fal", "https://queue.fal.run")?),
                RawBackend::Comfyui => {
                    refuse(
                        "comfyui",
                        &[
                            ("upstream_model", m.upstream_model.is_some()),
                            ("input", m.input.is_some()),
                        ],
                    )?;
                    let file = m.workflow.as_deref().ok_or_else(|| {
                        at(
                            &id,
                            "the comfyui backend needs `workflow`, the path of a workflow in \
                             ComfyUI's API format"
                                .to_owned(),
                        )
                    })?;
                    let path = dir.join(file);
                    let text = std::fs::read_to_string(&path)
                        .map_err(|e| at(&id, format!("`workflow` {}: {e}", path.display())))?;
                    let workflow: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                        at(&id, format!("`workflow` {}: not JSON: {e}", path.display()))
                    })?;
                    if !workflow.is_object()
                        || !super::backends::comfyui::has_prompt_placeholder(&workflow)
                    {
                        return Err(at(
                            &id,
                            format!(
                                "`workflow` {}: a workflow in API format (an object of nodes) \
                                 with a {{{{prompt}}}} placeholder",
                                path.display()
                            ),
                        ));
                    }
                    BackendSpec::ComfyUi {
                        url: url("comfyui", None)?,
                        api_key: match m.api_key_env {
                            Some(_) => Some(key("comfyui")?),
                            None => None,
                        },
                        workflow,
                    }
                }
            };
            let model = ModelSpec {
                name: m.name.unwrap_or_else(|| id.clone()),
                id: id.clone(),
                backend,
                prices: m.prices,
                max_n,
                concurrency,
                workers: if config.workers == 0 { 0 } else { concurrency },
                timeout,
            };
            models.insert(id, model);
        }
        let default = match raw.default {
            Some(default) if models.contains_key(&default) => default,
            Some(default) => {
                return Err(format!(
                    "`default = {default:?}` names no model of the catalogue"
                ))
            }
            None if models.len() == 1 => models.keys().next().cloned().unwrap_or_default(),
            None => {
                return Err(
                    "`default` must name the model a create without `model` gets".to_owned(),
                )
            }
        };
        Ok(Catalogue { default, models })
    }

    /// The model `id` names, or the default one.
    pub fn model(&self, id: Option<&str>) -> Option<&ModelSpec> {
        self.models.get(id.unwrap_or(&self.default))
    }
}

/// The line (from 1) of the table `[models.<id>]`, when written that way.
fn line_of(text: &str, id: &str) -> Option<usize> {
    let header = format!("[models.{id}]");
    let quoted = format!("[models.\"{id}\"]");
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.starts_with(&header) || l.starts_with(&quoted)
        })
        .map(|i| i + 1)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalogue {
    default: Option<String>,
    #[serde(default)]
    models: BTreeMap<String, RawModel>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: Option<String>,
    backend: RawBackend,
    url: Option<String>,
    upstream_model: Option<String>,
    api_key_env: Option<String>,
    prices: BTreeMap<ImageSize, u64>,
    max_n: Option<u8>,
    concurrency: Option<usize>,
    timeout: Option<String>,
    input: Option<toml::Table>,
    workflow: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawBackend {
    Builtin,
    Openai,
    Replicate,
    Fal,
    Comfyui,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(text: &str) -> Result<Catalogue, String> {
        let config = Config::new(std::path::Path::new("/tmp"));
        Catalogue::parse(text, std::path::Path::new("/tmp"), &config, |name| {
            (name == "UPSTREAM_KEY").then(|| "sk-test".to_owned())
        })
    }

    #[test]
    fn a_catalogue_of_two_models() {
        let c = parse(
            r#"
default = "sketch"

[models.sketch]
name = "Sketch"
backend = "builtin"
prices = { "256x256" = 1, "512x512" = 2 }
max_n = 2

[models.photo]
backend = "openai"
url = "http://127.0.0.1:9/v1"
api_key_env = "UPSTREAM_KEY"
upstream_model = "gpt-image-1"
prices = { "1024x1024" = 3 }
concurrency = 4
timeout = "5m"
"#,
        )
        .unwrap();
        assert_eq!(c.default, "sketch");
        let sketch = c.model(None).unwrap();
        assert_eq!((sketch.max_n, sketch.price(ImageSize::S512)), (2, Some(2)));
        assert_eq!(sketch.price(ImageSize::S1024), None);
        assert_eq!(sketch.default_size(), ImageSize::S512);
        let photo = c.model(Some("photo")).unwrap();
        assert_eq!(photo.name, "photo");
        assert_eq!(photo.default_size(), ImageSize::S1024);
        assert_eq!(photo.workers, 4);
        assert_eq!(
            (photo.concurrency, photo.timeout),
            (4, Duration::from_secs(300))
        );
        assert!(
            matches!(&photo.backend, BackendSpec::OpenAi { api_key, .. } if api_key.expose() == "sk-test")
        );
        assert!(!format!("{c:?}").contains("sk-test"), "the key is redacted");
        assert!(c.model(Some("nope")).is_none());
    }

    #[test]
    fn bad_files_say_where_and_why() {
        let cases = [
            ("[models.a]\nbackend = \"builtin\"\nprices = { \"300x300\" = 1 }\n", "line 3"),
            ("[models.a]\nbackend = \"dalle\"\nprices = { \"256x256\" = 1 }\n", "line 2"),
            ("[models.a]\nbackend = \"builtin\"\nprice = 1\n", "line 3"),
            ("[models.a]\nbackend = \"builtin\"\n", "prices"),
            ("\n[models.a]\nbackend = \"openai\"\nurl = \"http://x\"\napi_key_env = \"MISSING\"\nprices = { \"256x256\" = 1 }\n", "line 2, [models.a]: `api_key_env`: the variable MISSING is not set"),
            ("[models.a]\nbackend = \"builtin\"\nprices = { \"256x256\" = 1 }\nmax_n = 9\n", "`max_n` must be 1–4"),
            ("default = \"b\"\n[models.a]\nbackend = \"builtin\"\nprices = { \"256x256\" = 1 }\n", "names no model"),
            ("[models.a]\nbackend = \"comfyui\"\nurl = \"http://127.0.0.1:8188\"\nprices = { \"256x256\" = 1 }\n", "needs `workflow`"),
            ("[models.a]\nbackend = \"comfyui\"\nurl = \"http://127.0.0.1:8188\"\nworkflow = \"no-such-workflow.json\"\nprices = { \"256x256\" = 1 }\n", "no-such-workflow.json"),
            ("[models.a]\nbackend = \"replicate\"\napi_key_env = \"UPSTREAM_KEY\"\nprices = { \"256x256\" = 1 }\n", "needs `upstream_model`"),
            ("[models.a]\nbackend = \"replicate\"\napi_key_env = \"UPSTREAM_KEY\"\nupstream_model = \"flux\"\nprices = { \"256x256\" = 1 }\n", "owner/name"),
            ("[models.a]\nbackend = \"builtin\"\nprices = { \"256x256\" = 1 }\ninput = { steps = 4 }\n", "takes no `input`"),
            ("[models.a]\nbackend = \"builtin\"\nprices = { \"256x256\" = 1 }\ntimeout = \"soon\"\n", "`timeout`"),
            ("", "no models"),
            ("[models.a\n", "line 1"),
        ];
        for (text, expected) in cases {
            let err = parse(text).unwrap_err();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn without_a_file_one_model_at_the_configured_prices() {
        let mut config = Config::new(std::path::Path::new("/tmp"));
        config.prices = crate::Prices::parse("256x256=3").unwrap();
        let c = Catalogue::from_config(&config).unwrap();
        assert_eq!(c.default, DEFAULT_MODEL);
        let m = c.model(None).unwrap();
        assert_eq!(m.price(ImageSize::S256), Some(3));
        assert_eq!(m.price(ImageSize::S1024), Some(4));
        assert_eq!(m.max_n, 4);
    }
}
