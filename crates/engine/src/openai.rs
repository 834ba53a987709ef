//! The `openai` engine: any OpenAI-compatible chat server (vLLM, SGLang, llama-server,
//! Ollama, …) over HTTP, answers streamed as server-sent events.
//!
//! It exists for users who outgrow one machine: the model runs on a cluster, kibitz only
//! sends frames and reads text. Several upstream URLs can be given; each request goes to the
//! least busy one (see [`upstream`]), and a failing one rests for a while.
//!
//! Every stream uses the same engine and nothing is kept between requests (the servers do
//! their own prefix caching). Each upstream takes at most [`OpenAiConfig::max_in_flight`]
//! requests at once. Nothing waits in here: the scheduler in front is the one queue, and
//! [`Engine::parallelism`] tells it the room there is *now* (the caps of the upstreams that
//! are not resting), so a resting upstream's share waits in the scheduler, in priority
//! order, rather than piling onto the others. A request that still finds every candidate at
//! its cap (the few that were granted just before an upstream went to rest, or requests
//! submitted without the scheduler) is refused at once with [`EngineError::Busy`]; the
//! upstream is not blamed for that.
//!
//! A request becomes `POST {base}/chat/completions` with `stream: true`: a system message
//! and one user message whose content is the frames as base64 JPEG `image_url` parts, in
//! time order, then the prompt text. Thinking is switched off through
//! `chat_template_kwargs` (and any `<think>` block is stripped anyway).
//!
//! Reliability rules:
//! - A connection failure, an HTTP 5xx or 429 *before any text arrived* is tried once more
//!   on another upstream (or, for a connection failure, on the only one). Once text has
//!   arrived the request is never sent again: a cut stream ends the answer with an error.
//! - Three deadlines: connect, first token, total. Each ends with [`EngineError::Timeout`]
//!   naming which one.
//! - Dropping the [`Generation`] drops the HTTP response, which closes the connection; most
//!   servers then stop generating.
//! - The API key goes only into the `Authorization` header. It is never part of a log line,
//!   a status page, an error message or a `Debug` print.

use std::fmt;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{StatusCode, Url};
use serde_json::json;
use tokio::sync::{mpsc, OnceCell};
use tokio::time::{timeout_at, Instant};

use crate::{Engine, EngineError, EngineInfo, Frame, Generation, Image, Output, Request, Stats};

mod sse;
mod upstream;

use sse::{excerpt, parse_event, Event, SseParser, ThinkFilter, Timings, Usage};
use upstream::{Choice, Lease, NoLease, Outcome, Pool};

/// The stream-reading steps of [`read_answer`] without a connection, for the fuzz targets in
/// `fuzz/` (not an API).
#[doc(hidden)]
pub mod fuzzing {
    use super::sse::{parse_event, Event, SseParser, ThinkFilter};

    /// The data of every event in a body that arrives in `pieces`.
    pub fn sse_events(pieces: &[&[u8]]) -> Result<Vec<String>, String> {
        let mut parser = SseParser::default();
        let mut events = Vec::new();
        for piece in pieces {
            events.extend(parser.push(piece)?);
        }
        events.extend(parser.finish());
        Ok(events)
    }

    /// The text pieces of one event's data, and whether it says `[DONE]`.
    pub fn chunk_contents(data: &str) -> Result<(Vec<String>, bool), String> {
        let mut contents = Vec::new();
        for event in parse_event(data)? {
            match event {
                Event::Done => return Ok((contents, true)),
                Event::Chunk(chunk) => contents.extend(
                    chunk
                        .choices
                        .into_iter()
                        .next()
                        .and_then(|c| c.delta.content),
                ),
            }
        }
        Ok((contents, false))
    }

    /// The text shown for content arriving in `pieces`, `<think>` blocks removed.
    pub fn strip_think(pieces: &[&str]) -> String {
        let mut filter = ThinkFilter::default();
        let mut out: String = pieces.iter().map(|p| filter.push(p)).collect();
        out.push_str(&filter.finish());
        out
    }
}

/// How long to wait before trying the only upstream again after a connection failure.
const SAME_UPSTREAM_PAUSE: Duration = Duration::from_millis(200);
/// How much of an upstream's error body goes into a message.
const ERROR_BODY_CHARS: usize = 300;
/// How much of an upstream's error body is read at most: enough for any real error, and
/// a broken or hostile upstream sending megabytes costs no more than this.
const ERROR_BODY_MAX_BYTES: usize = 64 * 1024;

/// Settings of an [`OpenAiEngine`]. `Debug` never shows the API key.
#[derive(Clone)]
pub struct OpenAiConfig {
    /// Base URLs of the upstream servers, one or more. See [`normalize_base`] for the
    /// accepted forms (`http://host:8000`, `http://host:8000/v1/`, …).
    pub urls: Vec<String>,
    /// Model name sent in every request. `None`: the first id `GET {base}/models` lists.
    pub model: Option<String>,
    /// Sent as `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// To open a TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// From sending a request to its first piece of text.
    pub first_token_timeout: Duration,
    /// From `submit` to the end of the answer.
    pub total_timeout: Duration,
    /// First rest of a failed upstream; doubles on each failure in a row…
    pub cooldown: Duration,
    /// …up to this.
    pub max_cooldown: Duration,
    /// Most requests open on one upstream at once (at least 1). vLLM and SGLang batch
    /// many; a llama-server has as many as its `--parallel` slots.
    pub max_in_flight: usize,
    /// JPEG quality (1–100) for frames handed over as RGB.
    pub jpeg_quality: u8,
}

impl OpenAiConfig {
    pub fn new<S: Into<String>>(urls: impl IntoIterator<Item = S>) -> Self {
        OpenAiConfig {
            urls: urls.into_iter().map(Into::into).collect(),
            model: None,
            api_key: None,
            connect_timeout: Duration::from_secs(5),
            first_token_timeout: Duration::from_secs(30),
            total_timeout: Duration::from_secs(120),
            cooldown: Duration::from_secs(10),
            max_cooldown: Duration::from_secs(60),
            max_in_flight: 4,
            jpeg_quality: 85,
        }
    }
}

impl fmt::Debug for OpenAiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiConfig")
            .field(
                "urls",
                &self
                    .urls
                    .iter()
                    .map(|u| shown_url_str(u))
                    .collect::<Vec<_>>(),
            )
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<hidden>"))
            .field("connect_timeout", &self.connect_timeout)
            .field("first_token_timeout", &self.first_token_timeout)
            .field("total_timeout", &self.total_timeout)
            .field("cooldown", &self.cooldown)
            .field("max_cooldown", &self.max_cooldown)
            .field("max_in_flight", &self.max_in_flight)
            .field("jpeg_quality", &self.jpeg_quality)
            .finish()
    }
}

/// Turns what a user typed into the base that `/chat/completions` and `/models` hang off.
///
/// The rule: a trailing `/` goes; a URL that names the endpoint itself
/// (`…/chat/completions`) loses that part; a URL with no path at all gets `/v1`; any other
/// path is kept as it is (so `http://host:8000/v1`, `http://host:8000/v1/` and
/// `http://host:8000` are the same upstream, and `https://gw.example/openai/v1` is left
/// alone). Only `http` and `https` are accepted.
pub fn normalize_base(input: &str) -> Result<Url, String> {
    let mut url = Url::parse(input.trim()).map_err(|e| {
        format!(
            "--engine-url '{}' is not a URL ({e}); write it like http://host:8000/v1",
            shown_url_str(input)
        )
    })?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(format!(
            "--engine-url '{}' must start with http:// or https://",
            shown_url_str(input)
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!(
            "--engine-url '{}' names no host",
            shown_url_str(input)
        ));
    }
    url.set_query(None);
    url.set_fragment(None);
    let mut path = url.path().trim_end_matches('/').to_string();
    if let Some(stripped) = path.strip_suffix("/chat/completions") {
        path = stripped.to_string();
    }
    if path.is_empty() {
        path = "/v1".into();
    }
    url.set_path(&path);
    Ok(url)
}

/// A URL without any `user:password@` part, for people to read.
fn shown_url(url: &Url) -> String {
    let mut url = url.clone();
    if url.password().is_some() || !url.username().is_empty() {
        let _ = url.set_username("");
        let _ = url.set_password(None);
    }
    url.to_string()
}

fn shown_url_str(input: &str) -> String {
    match Url::parse(input.trim()) {
        Ok(url) => shown_url(&url),
        Err(_) => input.to_string(),
    }
}

/// Talks to one or more OpenAI-compatible servers. Cheap to clone; clones share the
/// upstreams and their state.
#[derive(Clone)]
pub struct OpenAiEngine {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Arc<Pool>,
    client: reqwest::Client,
    auth: Option<HeaderValue>,
    /// Replaces the API key by `***` in anything shown.
    secret: Option<String>,
    model: OnceCell<String>,
    config: OpenAiConfig,
    in_flight: AtomicUsize,
    /// For `submit` called outside a runtime (the runtime the engine was made in).
    runtime: Option<tokio::runtime::Handle>,
}

impl fmt::Debug for OpenAiEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiEngine")
            .field(
                "upstreams",
                &self
                    .inner
                    .pool
                    .upstreams()
                    .iter()
                    .map(|u| &u.shown)
                    .collect::<Vec<_>>(),
            )
            .field(
                "model",
                &self.inner.model.get().or(self.inner.config.model.as_ref()),
            )
            .field("api_key", &self.inner.secret.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

impl OpenAiEngine {
    /// Checks the settings and prepares the HTTP client; touches no network. Every bad URL is
    /// reported at once.
    pub fn new(config: OpenAiConfig) -> Result<Self, EngineError> {
        if config.urls.is_empty() {
            return Err(EngineError::Unavailable(
                "the openai engine needs at least one --engine-url (e.g. http://localhost:8000/v1)"
                    .into(),
            ));
        }
        let mut upstreams = Vec::new();
        let mut problems = Vec::new();
        for input in &config.urls {
            match normalize_base(input) {
                Ok(base) => {
                    if upstreams
                        .iter()
                        .any(|u: &upstream::Upstream| u.base == base)
                    {
                        problems.push(format!(
                            "--engine-url '{}' is given twice",
                            shown_url(&base)
                        ));
                    } else {
                        upstreams.push(upstream::Upstream {
                            shown: shown_url(&base),
                            base,
                        });
                    }
                }
                Err(e) => problems.push(e),
            }
        }
        if config.max_in_flight == 0 {
            problems.push("--engine-max-inflight must be at least 1".into());
        }
        for (flag, value) in [
            ("--engine-connect-timeout", config.connect_timeout),
            ("--engine-first-token-timeout", config.first_token_timeout),
            ("--engine-total-timeout", config.total_timeout),
            ("--engine-cooldown", config.cooldown),
            ("--engine-max-cooldown", config.max_cooldown),
        ] {
            if value.is_zero() {
                problems.push(format!("{flag} must be more than 0 seconds"));
            }
        }
        if !(1..=100).contains(&config.jpeg_quality) {
            problems.push(format!(
                "JPEG quality {} is outside 1..=100",
                config.jpeg_quality
            ));
        }
        if config.model.as_deref().is_some_and(|m| m.trim().is_empty()) {
            problems.push(
                "--engine-model is empty; leave it out to use the server's first model".into(),
            );
        }
        let secret = config.api_key.clone().filter(|k| !k.is_empty());
        let auth = match &secret {
            Some(key) => match HeaderValue::from_str(&format!("Bearer {key}")) {
                Ok(mut value) => {
                    value.set_sensitive(true);
                    Some(value)
                }
                Err(_) => {
                    problems.push("the API key holds characters an HTTP header can't carry".into());
                    None
                }
            },
            None => None,
        };
        if !problems.is_empty() {
            return Err(EngineError::Unavailable(problems.join("; ")));
        }
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| EngineError::Unavailable(format!("cannot set up the HTTP client: {e}")))?;
        let pool = Arc::new(Pool::new(
            upstreams,
            config.cooldown,
            config.max_cooldown,
            config.max_in_flight,
        ));
        let model = OnceCell::new_with(config.model.clone());
        Ok(OpenAiEngine {
            inner: Arc::new(Inner {
                pool,
                client,
                auth,
                secret,
                model,
                config,
                in_flight: AtomicUsize::new(0),
                runtime: tokio::runtime::Handle::try_current().ok(),
            }),
        })
    }

    /// [`new`](Self::new), then learns the model name from the servers if none was given,
    /// so a wrong URL or key shows at startup rather than at the first request.
    pub async fn connect(config: OpenAiConfig) -> Result<Self, EngineError> {
        let engine = Self::new(config)?;
        engine.model().await?;
        Ok(engine)
    }

    /// Requests the engine runs at once when every upstream is up: upstreams ×
    /// `max_in_flight`. [`Engine::parallelism`] is the part of it usable now.
    pub fn capacity(&self) -> usize {
        self.inner.pool.capacity()
    }

    /// The model name: as configured, or the first one the upstreams list (asked once).
    pub async fn model(&self) -> Result<String, EngineError> {
        let inner = &self.inner;
        inner
            .model
            .get_or_try_init(|| inner.discover_model())
            .await
            .cloned()
    }
}

impl Inner {
    fn redact(&self, message: impl Into<String>) -> String {
        let message = message.into();
        match &self.secret {
            Some(key) => message.replace(key.as_str(), "***"),
            None => message,
        }
    }

    fn get(&self, url: String) -> reqwest::RequestBuilder {
        let mut builder = self.client.get(url);
        if let Some(auth) = &self.auth {
            builder = builder.header(AUTHORIZATION, auth.clone());
        }
        builder
    }

    async fn discover_model(&self) -> Result<String, EngineError> {
        let mut problems = Vec::new();
        for up in self.pool.upstreams() {
            let url = format!("{}/models", up.base);
            let wait = self.config.connect_timeout + self.config.first_token_timeout;
            let answer = tokio::time::timeout(wait, async {
                let response = self
                    .get(url)
                    .send()
                    .await
                    .map_err(|e| describe_reqwest(&e))?;
                let status = response.status();
                if !status.is_success() {
                    let body = error_body(response).await;
                    return Err(format!(
                        "HTTP {status}: {}{}",
                        excerpt(body.trim(), ERROR_BODY_CHARS),
                        status_hint(status)
                    ));
                }
                let list: serde_json::Value = response
                    .json()
                    .await
                    .map_err(|e| format!("the model list is not JSON: {e}"))?;
                list["data"]
                    .as_array()
                    .and_then(|models| models.iter().find_map(|m| m["id"].as_str()))
                    .map(str::to_string)
                    .ok_or_else(|| "it lists no model".to_string())
            })
            .await;
            match answer {
                Ok(Ok(model)) => {
                    tracing::info!(model, upstream = %up.shown, "openai engine: using the upstream's first model");
                    return Ok(model);
                }
                Ok(Err(e)) => problems.push(format!("{}/models: {e}", up.shown)),
                Err(_) => problems.push(format!("{}/models: no answer within {wait:?}", up.shown)),
            }
        }
        Err(EngineError::Unavailable(self.redact(format!(
            "no --engine-model given and no upstream named one ({}); pass --engine-model NAME",
            problems.join("; ")
        ))))
    }
}

/// Counts a request in the engine's `in_flight` while it lives.
struct Counted(Arc<Inner>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

type Sender = mpsc::Sender<Result<Output, EngineError>>;

impl Engine for OpenAiEngine {
    fn submit(&self, request: Request) -> Result<Generation, EngineError> {
        let runtime = tokio::runtime::Handle::try_current()
            .ok()
            .or_else(|| self.inner.runtime.clone())
            .ok_or_else(|| {
                EngineError::Unavailable(
                    "the openai engine must be used inside a tokio runtime".into(),
                )
            })?;
        let (tx, generation) = Generation::channel();
        self.inner.in_flight.fetch_add(1, Ordering::SeqCst);
        let counted = Counted(self.inner.clone());
        let submitted = Instant::now();
        runtime.spawn(async move {
            let inner = counted.0.clone();
            tokio::select! {
                // The caller dropped the Generation: dropping `answer` drops the HTTP
                // response and so closes the connection.
                () = tx.closed() => {}
                result = answer(&inner, request, &tx, submitted) => {
                    let item = match result {
                        Ok(stats) => Ok(Output::Done(stats)),
                        Err(Failure::Cancelled) => return,
                        Err(Failure::Engine(e)) => Err(e),
                    };
                    let _ = tx.send(item).await;
                }
            }
            drop(counted);
        });
        Ok(generation)
    }

    fn info(&self) -> EngineInfo {
        let model = self
            .inner
            .model
            .get()
            .cloned()
            .unwrap_or_else(|| "(the server's first model, not asked yet)".into());
        let backend = self
            .inner
            .pool
            .upstreams()
            .iter()
            .map(|u| u.shown.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        EngineInfo {
            kind: "openai".into(),
            model,
            backend,
        }
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::SeqCst)
    }

    /// The room now: `max_in_flight` for every upstream that is not resting (one for one
    /// being probed). At least 1, so that while every upstream rests a request still comes
    /// through and is answered at once with why.
    fn parallelism(&self) -> usize {
        self.inner.pool.capacity_now(Instant::now()).max(1)
    }

    /// True when some upstream answers `GET /models` with anything below 500 within the
    /// connect timeout plus two seconds. Resting upstreams are asked too: a rest is this
    /// engine holding back after a failure (or a `Retry-After`), not the upstream being
    /// gone, and the one upstream resting for a minute is no reason to restart anything.
    fn health(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let inner = &self.inner;
            let wait = inner.config.connect_timeout + Duration::from_secs(2);
            let probes = inner.pool.upstreams().iter().map(|up| {
                let url = format!("{}/models", up.base);
                async move {
                    matches!(tokio::time::timeout(wait, inner.get(url).send()).await,
                        Ok(Ok(r)) if !r.status().is_server_error())
                }
            });
            futures::future::join_all(probes)
                .await
                .into_iter()
                .any(|ok| ok)
        })
    }

    fn status(&self) -> serde_json::Value {
        let inner = &self.inner;
        json!({
            "model": inner.model.get(),
            "policy": "least requests in flight, ties round-robin, at most max_in_flight each",
            "max_in_flight": inner.pool.max_in_flight(),
            "capacity": inner.pool.capacity(),
            "capacity_now": inner.pool.capacity_now(Instant::now()),
            "timeouts_ms": {
                "connect": inner.config.connect_timeout.as_millis() as u64,
                "first_token": inner.config.first_token_timeout.as_millis() as u64,
                "total": inner.config.total_timeout.as_millis() as u64,
            },
            "cooldown_ms": {
                "first": inner.config.cooldown.as_millis() as u64,
                "max": inner.config.max_cooldown.as_millis() as u64,
            },
            "upstreams": inner.pool.status(Instant::now()),
        })
    }

    fn register_metrics(&self, registry: &mut crate::metrics::Registry) {
        self.inner.pool.metrics(Instant::now()).register(registry);
    }
}

/// Why a request did not finish with text.
enum Failure {
    Engine(EngineError),
    Cancelled,
}

impl From<EngineError> for Failure {
    fn from(e: EngineError) -> Self {
        Failure::Engine(e)
    }
}

/// How one attempt on one upstream went wrong.
enum AttemptError {
    /// Nothing was streamed yet: another try may follow. `connection` is true when the
    /// request may not even have reached the server.
    /// `retry_after`: how long the upstream asked to be left alone (`Retry-After`).
    Retryable {
        error: EngineError,
        connection: bool,
        retry_after: Option<Duration>,
    },
    /// The answer is over (text already went out, or the request itself is at fault).
    /// `rest`: the upstream is to blame and should rest.
    Final {
        error: EngineError,
        rest: bool,
    },
    Cancelled,
}

/// Runs one request to the end: picks upstreams, retries before any text, streams text.
async fn answer(
    inner: &Inner,
    request: Request,
    tx: &Sender,
    submitted: Instant,
) -> Result<Stats, Failure> {
    let model = inner
        .model
        .get_or_try_init(|| inner.discover_model())
        .await?
        .clone();
    let images = request.frames.len() as u32;
    let quality = inner.config.jpeg_quality;
    // JPEG encoding and base64 are CPU work of a few milliseconds: keep them off the
    // runtime's threads.
    let body = tokio::task::spawn_blocking(move || request_body(&model, &request, quality))
        .await
        .map_err(|e| EngineError::Failed(format!("building the request failed: {e}")))??;

    let mut tried: Vec<usize> = Vec::new();
    let mut retry_same: Option<usize> = None;
    // What went wrong on the first try, when a second one follows.
    let mut previous: Option<String> = None;
    loop {
        let choice = match retry_same.take() {
            Some(i) => {
                tokio::time::sleep(SAME_UPSTREAM_PAUSE).await;
                Choice::Only(i)
            }
            None => Choice::Any { skip: &tried },
        };
        let lease = match inner.pool.lease(choice, Instant::now()) {
            Ok(lease) => lease,
            Err(none) => return Err(refusal(inner, none, previous).into()),
        };
        let index = lease.index;
        let first_try = tried.is_empty();
        tried.push(index);
        let result = attempt(inner, &lease, body.clone(), images, tx, submitted).await;
        let (outcome, error, retry) = match result {
            Ok(stats) => {
                lease.finish(Outcome::Ok, None, Instant::now());
                return Ok(stats);
            }
            // The lease, dropped, counts the cancellation.
            Err(AttemptError::Cancelled) => return Err(Failure::Cancelled),
            Err(AttemptError::Final { error, rest }) => {
                let outcome = match &error {
                    EngineError::Timeout(_) => Outcome::Timeout,
                    _ => Outcome::Error { rest },
                };
                (outcome, error, false)
            }
            Err(AttemptError::Retryable {
                error,
                connection,
                retry_after,
            }) => {
                // The only upstream gets a second try, and only rests if that fails too.
                let alone = inner.pool.upstreams().len() == 1;
                if first_try && connection && alone {
                    retry_same = Some(index);
                }
                let outcome = match retry_after {
                    Some(wait) => Outcome::RetryAfter(wait),
                    None => Outcome::Error {
                        rest: retry_same.is_none(),
                    },
                };
                (outcome, error, first_try)
            }
        };
        let error = redact_error(inner, error);
        lease.finish(outcome, Some(error.to_string()), Instant::now());
        if retry {
            let message = detail(&error).to_string();
            tracing::warn!(upstream = %inner.pool.upstreams()[index].shown, error = %message, "openai engine: trying again");
            previous = Some(message);
            continue;
        }
        return Err(match previous {
            Some(first) => map_detail(error, |m| format!("{first}; then {m}")),
            None => error,
        }
        .into());
    }
}

/// Why no upstream took the request, after `previous` went wrong on a first try (if one
/// did): every candidate resting is `Unavailable`, every candidate at its cap is `Busy`.
fn refusal(inner: &Inner, none: NoLease, previous: Option<String>) -> EngineError {
    match none {
        NoLease::Resting => {
            let why = inner.pool.why_none(Instant::now());
            let message = match previous {
                Some(first) if inner.pool.upstreams().len() == 1 => first,
                Some(first) => format!("{first}; no other upstream could take it: {why}"),
                None => why,
            };
            EngineError::Unavailable(inner.redact(message))
        }
        NoLease::Full { rest_ends } => {
            let mut why = format!(
                "every upstream that could take it has {} requests in flight, its cap \
                 (--engine-max-inflight)",
                inner.pool.max_in_flight(),
            );
            if let Some(ends) = rest_ends {
                let back = ends.saturating_duration_since(Instant::now());
                let _ = write!(
                    why,
                    "; a resting one is back in {:.1} s",
                    back.as_secs_f64()
                );
            }
            let message = match previous {
                Some(first) => format!("{first}; then {why}"),
                None => why,
            };
            EngineError::Busy(inner.redact(message))
        }
    }
}

/// An error's message without the prefix its kind adds.
fn detail(error: &EngineError) -> &str {
    match error {
        EngineError::BadRequest(m)
        | EngineError::Busy(m)
        | EngineError::Unavailable(m)
        | EngineError::Failed(m)
        | EngineError::Stopped(m)
        | EngineError::Timeout(m) => m,
    }
}

fn redact_error(inner: &Inner, error: EngineError) -> EngineError {
    map_detail(error, |m| inner.redact(m))
}

/// The same kind of error with its message changed.
fn map_detail(error: EngineError, f: impl FnOnce(String) -> String) -> EngineError {
    match error {
        EngineError::BadRequest(m) => EngineError::BadRequest(f(m)),
        EngineError::Busy(m) => EngineError::Busy(f(m)),
        EngineError::Unavailable(m) => EngineError::Unavailable(f(m)),
        EngineError::Failed(m) => EngineError::Failed(f(m)),
        EngineError::Stopped(m) => EngineError::Stopped(f(m)),
        EngineError::Timeout(m) => EngineError::Timeout(f(m)),
    }
}

/// What one streamed answer has gathered so far.
#[derive(Default)]
struct Progress {
    /// Content pieces received (before `<think>` filtering): "tokens" in messages.
    pieces: u32,
    first_text: Option<Instant>,
    last_text: Option<Instant>,
    usage: Option<Usage>,
    timings: Option<Timings>,
    finished: bool,
}

/// One try on one upstream: send, then read the answer's stream to its end.
async fn attempt(
    inner: &Inner,
    lease: &Lease,
    body: Bytes,
    images: u32,
    tx: &Sender,
    submitted: Instant,
) -> Result<Stats, AttemptError> {
    let upstream = lease.upstream();
    let deadlines = Deadlines::new(inner, submitted, &upstream.shown);
    let url = format!("{}/chat/completions", upstream.base);
    let response = send(inner, &url, body, &deadlines).await?;
    let progress = read_answer(response, tx, &deadlines).await?;
    Ok(stats(&progress, submitted, images))
}

/// The two deadlines of one try, and the error each one gives.
struct Deadlines<'a> {
    /// For the first piece of text: the first-token timeout from this try's start (never
    /// past `total`).
    first: Instant,
    /// For the whole answer, from `submit`.
    total: Instant,
    config: &'a OpenAiConfig,
    /// `…/chat/completions` as people may see it.
    shown: String,
}

impl<'a> Deadlines<'a> {
    fn new(inner: &'a Inner, submitted: Instant, upstream: &str) -> Self {
        let config = &inner.config;
        let total = submitted + config.total_timeout;
        Deadlines {
            first: (Instant::now() + config.first_token_timeout).min(total),
            total,
            config,
            shown: format!("{upstream}/chat/completions"),
        }
    }

    /// The deadline that applies once `pieces` pieces have come.
    fn next(&self, pieces: u32) -> Instant {
        if pieces == 0 {
            self.first
        } else {
            self.total
        }
    }

    /// The error for `deadline` passing after `pieces` pieces. Either way the upstream
    /// rests: it was too slow.
    fn expired(&self, deadline: Instant, pieces: u32) -> AttemptError {
        let shown = &self.shown;
        let message = if deadline < self.total {
            format!(
                "first-token timeout: {shown} sent no text within {:?}",
                self.config.first_token_timeout
            )
        } else {
            format!(
                "total timeout: the answer from {shown} took longer than {:?} (after {pieces} tokens)",
                self.config.total_timeout
            )
        };
        AttemptError::Final {
            error: EngineError::Timeout(message),
            rest: true,
        }
    }
}

/// Posts the request and checks the answer's HTTP status; the response it returns is the
/// start of a good event stream.
async fn send(
    inner: &Inner,
    url: &str,
    body: Bytes,
    deadlines: &Deadlines<'_>,
) -> Result<reqwest::Response, AttemptError> {
    let shown = &deadlines.shown;
    let mut builder = inner
        .client
        .post(url)
        .header(CONTENT_TYPE, "application/json")
        .header(ACCEPT, "text/event-stream")
        .body(body);
    if let Some(auth) = &inner.auth {
        builder = builder.header(AUTHORIZATION, auth.clone());
    }
    let response = match timeout_at(deadlines.first, builder.send()).await {
        Err(_) => return Err(deadlines.expired(deadlines.first, 0)),
        Ok(Err(e)) => {
            // Connect errors, and connections closed before any answer: the request
            // produced nothing, so even the same upstream may be asked again.
            let what = if e.is_connect() && e.is_timeout() {
                format!(
                    "connect timeout: {shown} did not accept a connection within {:?}",
                    inner.config.connect_timeout
                )
            } else {
                format!("cannot reach {shown}: {}", describe_reqwest(&e))
            };
            return Err(AttemptError::Retryable {
                error: EngineError::Unavailable(what),
                connection: true,
                retry_after: None,
            });
        }
        Ok(Ok(response)) => response,
    };
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let retry_after = retry_after(response.headers(), std::time::SystemTime::now());
    let body = timeout_at(deadlines.first, error_body(response))
        .await
        .unwrap_or_default();
    let message = format!(
        "{shown} answered HTTP {status}: {}{}",
        excerpt(body.trim(), ERROR_BODY_CHARS),
        status_hint(status)
    );
    Err(
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            AttemptError::Retryable {
                error: EngineError::Unavailable(message),
                connection: false,
                retry_after,
            }
        } else {
            // The upstream is up; the request (or the key, or the model name) is wrong.
            AttemptError::Final {
                error: EngineError::Failed(message),
                rest: false,
            }
        },
    )
}

/// An error answer's body as text, read up to [`ERROR_BODY_MAX_BYTES`]; the rest is never
/// read (the connection is dropped with the response).
async fn error_body(mut response: reqwest::Response) -> String {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = ERROR_BODY_MAX_BYTES - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= ERROR_BODY_MAX_BYTES {
            break;
        }
    }
    String::from_utf8_lossy(&body).into_owned()
}

/// `Retry-After` as a wait from `now`: delay-seconds or an HTTP-date (RFC 9110 §10.2.3).
/// A date in the past is no wait; anything unreadable is ignored.
fn retry_after(
    headers: &reqwest::header::HeaderMap,
    now: std::time::SystemTime,
) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Reads the event stream to `[DONE]` (or a finished stream's end), passing text on as it
/// comes; a stream cut before it finished is an error.
async fn read_answer(
    response: reqwest::Response,
    tx: &Sender,
    deadlines: &Deadlines<'_>,
) -> Result<Progress, AttemptError> {
    let shown = deadlines.shown.as_str();
    let mut stream = response.bytes_stream();
    let mut parser = SseParser::default();
    let mut filter = ThinkFilter::default();
    let mut progress = Progress::default();
    let mut done = false;
    while !done {
        let deadline = deadlines.next(progress.pieces);
        let next = timeout_at(deadline, stream.next())
            .await
            .map_err(|_| deadlines.expired(deadline, progress.pieces))?;
        let events = match next {
            Some(Ok(bytes)) => parser.push(&bytes),
            Some(Err(e)) => {
                if let Some(last) = parser.finish() {
                    handle(&last, &mut progress, &mut filter, tx, shown).await?;
                }
                if progress.finished {
                    break;
                }
                return Err(cut(shown, progress.pieces, &describe_reqwest(&e)));
            }
            None => {
                if let Some(last) = parser.finish() {
                    done = handle(&last, &mut progress, &mut filter, tx, shown).await?;
                }
                if done || progress.finished {
                    break;
                }
                return Err(cut(shown, progress.pieces, "the connection closed"));
            }
        }
        .map_err(|e| AttemptError::Final {
            error: EngineError::Failed(format!("{shown} sent a broken stream: {e}")),
            rest: true,
        })?;
        for data in events {
            if handle(&data, &mut progress, &mut filter, tx, shown).await? {
                done = true;
                break;
            }
        }
    }
    // What the think filter held back at the end (text that only looked like a tag).
    let rest = filter.finish();
    if !rest.is_empty() {
        progress.first_text.get_or_insert_with(Instant::now);
        tx.send(Ok(Output::Text(rest)))
            .await
            .map_err(|_| AttemptError::Cancelled)?;
    }
    Ok(progress)
}

/// A stream that ended before it was finished.
fn cut(shown: &str, pieces: u32, why: &str) -> AttemptError {
    if pieces == 0 {
        AttemptError::Retryable {
            error: EngineError::Unavailable(format!(
                "{shown} ended the stream before any text ({why})"
            )),
            connection: false,
            retry_after: None,
        }
    } else {
        AttemptError::Final {
            error: EngineError::Failed(format!(
                "{shown}: stream cut after {pieces} tokens ({why})"
            )),
            rest: true,
        }
    }
}

/// Handles one event; returns true at `[DONE]`.
async fn handle(
    data: &str,
    progress: &mut Progress,
    filter: &mut ThinkFilter,
    tx: &Sender,
    shown: &str,
) -> Result<bool, AttemptError> {
    let events = parse_event(data).map_err(|e| AttemptError::Final {
        error: EngineError::Failed(format!("{shown} sent a {e}")),
        rest: true,
    })?;
    for event in events {
        let chunk = match event {
            Event::Done => return Ok(true),
            Event::Chunk(chunk) => chunk,
        };
        if let Some(error) = chunk.error {
            let message = error["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| error.to_string());
            // The server is alive and says what went wrong with this request.
            return Err(AttemptError::Final {
                error: EngineError::Failed(format!(
                    "{shown} reported an error after {} tokens: {}",
                    progress.pieces,
                    excerpt(&message, ERROR_BODY_CHARS)
                )),
                rest: false,
            });
        }
        if chunk.usage.is_some() {
            progress.usage = chunk.usage;
        }
        if chunk.timings.is_some() {
            progress.timings = chunk.timings;
        }
        if let Some(choice) = chunk.choices.into_iter().next() {
            if choice.finish_reason.is_some() {
                progress.finished = true;
            }
            if let Some(content) = choice.delta.content.filter(|c| !c.is_empty()) {
                progress.pieces += 1;
                let text = filter.push(&content);
                if !text.is_empty() {
                    let now = Instant::now();
                    progress.first_text.get_or_insert(now);
                    progress.last_text = Some(now);
                    tx.send(Ok(Output::Text(text)))
                        .await
                        .map_err(|_| AttemptError::Cancelled)?;
                }
            }
        }
    }
    Ok(false)
}

fn stats(progress: &Progress, submitted: Instant, images: u32) -> Stats {
    let now = Instant::now();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let usage = progress.usage.clone().unwrap_or_default();
    let timings = progress.timings.clone().unwrap_or_default();
    let generated = usage
        .completion_tokens
        .or(timings.predicted_n.map(|n| n as u32))
        .unwrap_or(progress.pieces);
    let first_token_ms = progress
        .first_text
        .map(|t| ms(t - submitted))
        .unwrap_or(0.0);
    let own_decode_ms = match (progress.first_text, progress.last_text) {
        (Some(first), Some(last)) => ms(last - first),
        _ => 0.0,
    };
    let decode_ms = timings.predicted_ms.unwrap_or(own_decode_ms);
    let decode_tokens_per_s = match timings.predicted_per_second {
        Some(rate) => rate,
        // The first token's time belongs to prefill: the rate counts the ones after it.
        None if generated > 1 && decode_ms > 0.0 => f64::from(generated - 1) / decode_ms * 1e3,
        None => 0.0,
    };
    Stats {
        prompt_tokens: usage.prompt_tokens.unwrap_or(0),
        image_tokens: 0,
        cached_tokens: usage
            .prompt_tokens_details
            .and_then(|d| d.cached_tokens)
            .or(timings.cache_n.map(|n| n as u32))
            .unwrap_or(0),
        images,
        reused_images: 0,
        vision_ms: 0.0,
        prefill_ms: timings.prompt_ms.unwrap_or(0.0),
        generated_tokens: generated,
        decode_ms,
        decode_tokens_per_s,
        first_token_ms,
        queue_ms: 0.0,
        total_ms: ms(now - submitted),
    }
}

/// The JSON body of a chat completion request.
fn request_body(model: &str, request: &Request, quality: u8) -> Result<Bytes, EngineError> {
    let mut frames: Vec<&Frame> = request.frames.iter().collect();
    // Time order is what the model is told; a stable sort keeps equal stamps as given.
    frames.sort_by_key(|f| f.pts);
    let mut content = Vec::with_capacity(frames.len() + 1);
    for (i, frame) in frames.iter().enumerate() {
        let jpeg = jpeg_bytes(&frame.image, quality)
            .map_err(|e| EngineError::BadRequest(format!("frame {i}: {e}")))?;
        let url = format!(
            "data:image/jpeg;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(&jpeg)
        );
        content.push(json!({ "type": "image_url", "image_url": { "url": url } }));
    }
    content.push(json!({ "type": "text", "text": request.user }));
    let mut messages = Vec::new();
    if !request.system.is_empty() {
        messages.push(json!({ "role": "system", "content": request.system }));
    }
    messages.push(json!({ "role": "user", "content": content }));
    let s = &request.sampling;
    let mut body = json!({
        "model": model,
        "messages": messages,
        "stream": true,
        "stream_options": { "include_usage": true },
        "max_tokens": request.max_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        // Not in OpenAI's own API; vLLM, SGLang, llama-server and Ollama take it.
        "top_k": s.top_k,
        "seed": s.seed,
        "chat_template_kwargs": { "enable_thinking": false },
    });
    if request.ignore_eos {
        body["ignore_eos"] = json!(true);
    }
    serde_json::to_vec(&body)
        .map(Bytes::from)
        .map_err(|e| EngineError::Failed(format!("cannot write the request: {e}")))
}

fn jpeg_bytes(image: &Image, quality: u8) -> Result<Bytes, String> {
    match image {
        Image::Jpeg(jpeg) => Ok(jpeg.bytes.clone()),
        Image::Rgb(rgb) => {
            let (w, h) = (rgb.width as usize, rgb.height as usize);
            if w == 0 || h == 0 {
                return Err(format!("an empty {w}x{h} picture"));
            }
            if rgb.data.len() != w * h * 3 {
                return Err(format!(
                    "{w}x{h} RGB needs {} bytes, got {}",
                    w * h * 3,
                    rgb.data.len()
                ));
            }
            kibitz_frames::JpegEncoder::new(quality)
                .and_then(|mut encoder| encoder.encode_rgb(rgb))
                .map(|jpeg| jpeg.bytes)
                .map_err(|e| format!("JPEG encoding failed: {e}"))
        }
    }
}

/// reqwest's error plus its causes, which hold the useful part ("connection refused").
fn describe_reqwest(e: &reqwest::Error) -> String {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

fn status_hint(status: StatusCode) -> &'static str {
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => " (check --api-key)",
        StatusCode::NOT_FOUND => {
            " (check --engine-url: it should end where /chat/completions starts, e.g. http://host:8000/v1; and --engine-model)"
        }
        StatusCode::TOO_MANY_REQUESTS => " (the upstream is overloaded or rate-limited)",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kibitz_frames::Rgb;

    #[test]
    fn base_urls_with_or_without_v1_and_slash_are_the_same() {
        for input in [
            "http://host:8000",
            "http://host:8000/",
            "http://host:8000/v1",
            "http://host:8000/v1/",
            " http://host:8000/v1/chat/completions ",
        ] {
            assert_eq!(
                normalize_base(input).unwrap().as_str(),
                "http://host:8000/v1",
                "{input}"
            );
        }
        assert_eq!(
            normalize_base("https://gw.example/openai/v1beta/")
                .unwrap()
                .as_str(),
            "https://gw.example/openai/v1beta"
        );
        assert!(normalize_base("host:8000").unwrap_err().contains("http://"));
        assert!(normalize_base("not a url")
            .unwrap_err()
            .contains("not a URL"));
        assert!(normalize_base("ftp://host/v1")
            .unwrap_err()
            .contains("http://"));
    }

    #[test]
    fn bad_settings_are_all_reported_at_once() {
        let mut config = OpenAiConfig::new(["nope", "http://a:1/v1", "http://a:1", "ftp://b"]);
        config.jpeg_quality = 0;
        config.max_in_flight = 0;
        config.first_token_timeout = Duration::ZERO;
        let EngineError::Unavailable(message) = OpenAiEngine::new(config).unwrap_err() else {
            panic!()
        };
        for part in [
            "'nope'",
            "twice",
            "ftp://b",
            "JPEG quality",
            "--engine-max-inflight must be at least 1",
            "--engine-first-token-timeout must be more than 0",
        ] {
            assert!(message.contains(part), "{part} missing in: {message}");
        }
        assert!(matches!(
            OpenAiEngine::new(OpenAiConfig::new(Vec::<String>::new())),
            Err(EngineError::Unavailable(_))
        ));
    }

    #[test]
    fn url_credentials_and_the_key_stay_out_of_debug_and_info() {
        let mut config = OpenAiConfig::new(["http://user:pa55word@host:8000"]);
        config.api_key = Some("sk-unit-secret".into());
        config.model = Some("m".into());
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("sk-unit-secret") && !shown.contains("pa55word"),
            "{shown}"
        );
        let engine = OpenAiEngine::new(config).unwrap();
        let shown = format!("{engine:?} {:?}", engine.info());
        assert!(
            !shown.contains("sk-unit-secret") && !shown.contains("pa55word"),
            "{shown}"
        );
        assert!(shown.contains("http://host:8000/v1"), "{shown}");
        assert_eq!(
            engine.inner.redact("echo: Bearer sk-unit-secret"),
            "echo: Bearer ***"
        );
    }

    #[test]
    fn a_frame_whose_bytes_do_not_match_its_size_is_a_bad_request() {
        let rgb = Rgb {
            width: 4,
            height: 4,
            data: vec![0u8; 10].into(),
        };
        let request = Request::new(
            vec![Frame {
                image: Image::Rgb(rgb),
                pts: Duration::ZERO,
            }],
            "s",
            "u",
        );
        let error = request_body("m", &request, 85).unwrap_err();
        assert!(
            matches!(&error, EngineError::BadRequest(m) if m.contains("frame 0") && m.contains("48 bytes")),
            "{error}"
        );
    }
}
