//! Parsing and planning a completions request: prompts, stop strings, sampling and limits.
//!
//! Invariants:
//! - Every error names its field in `param`: a 400 `invalid_value`, a 404 `model_not_found` for
//!   a `model` that is neither the served name nor its version, a 413 for more prompts than the
//!   limit. An unknown field is a 400 too.
//! - A plan exists only for a request valid throughout: `n` in 1..=`max_n`, `temperature` in
//!   [0, 2], `top_p` in (0, 1], `logprobs` at most `max_logprobs`, at most 4 stop strings, none
//!   empty, `stream_options` only with `stream`, every prompt non-empty with ids below the
//!   vocabulary size, and prompt + `max_tokens` within the context length (checked without
//!   overflow).
//! - Text prompts are tokenized without dropping anything: a character outside the vocabulary is
//!   a 400 naming the prompt and the position.
//! - The plan holds one generation per choice, in choice order (prompt `i`, choice `j` at
//!   `i × n + j`), none when `max_tokens` is 0, each with the regurgitation guard when takedowns
//!   are enabled; choice `c` of a seeded request gets seed `seed + c` (wrapping).
//! - `user` is accepted for compatibility and ignored, never logged.

use super::*;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: Value,
    #[serde(default)]
    pub max_tokens: Option<usize>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Not in OpenAI's API (as in vLLM): keep only the k most likely tokens; 0 disables.
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub n: Option<usize>,
    #[serde(default)]
    pub stop: Option<Value>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub logprobs: Option<usize>,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Accepted for compatibility and ignored (never logged).
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// OpenAI's default `max_tokens` for completions.
pub(super) const DEFAULT_MAX_TOKENS: usize = 16;

/// The status recorded (never received) when the client left before the answer: nginx's 499.
pub(super) fn client_closed() -> actix_web::http::StatusCode {
    actix_web::http::StatusCode::from_u16(499).unwrap_or(actix_web::http::StatusCode::BAD_REQUEST)
}
pub(super) const MAX_STOP_STRINGS: usize = 4;

/// A 404 unless `model` (when given) names the served model or its version.
pub fn check_model(model: Option<&str>, s: &Served) -> Result<(), ApiError> {
    match model {
        Some(m) if m != s.name && m != s.version => Err(ApiError::NotFound {
            message: format!(
                "model {m:?} is not served here; this server serves {:?}",
                s.name
            ),
            param: Some("model".into()),
            code: "model_not_found",
        }),
        _ => Ok(()),
    }
}

/// One prompt: its token ids and its text.
pub(super) struct Prompt {
    pub(super) ids: Vec<u32>,
    pub(super) text: String,
}

pub(super) fn parse_prompts(
    v: &Value,
    s: &Served,
    max_prompts: usize,
) -> Result<Vec<Prompt>, ApiError> {
    let shape = || {
        ApiError::invalid(
            "prompt",
            "must be a string, a list of strings, a list of token ids, or a list of token-id lists",
        )
    };
    let vocab = s.model.spec().vocab_size;
    let ids_of = |arr: &[Value], field: &str| -> Result<Vec<u32>, ApiError> {
        arr.iter()
            .enumerate()
            .map(|(j, t)| match t.as_u64() {
                Some(t) if (t as usize) < vocab => Ok(t as u32),
                _ => Err(ApiError::invalid(
                    format!("{field}[{j}]"),
                    format!("{t} is not a token id (an integer below the vocabulary size {vocab})"),
                )),
            })
            .collect()
    };
    let text_prompt = |t: &str, field: &str| -> Result<Prompt, ApiError> {
        Ok(Prompt {
            ids: s.tokenizer.encode_field(field, t)?,
            text: t.to_string(),
        })
    };
    let id_prompt = |ids: Vec<u32>| -> Result<Prompt, ApiError> {
        Ok(Prompt {
            text: s.tokenizer.decode(&ids)?,
            ids,
        })
    };
    // The count is checked before any prompt is tokenized or decoded: an oversized list costs
    // its parse, nothing more.
    let count = match v {
        Value::Array(items) if items.iter().all(|x| x.is_string() || x.is_array()) => items.len(),
        _ => 1,
    };
    if count > max_prompts {
        return Err(ApiError::TooLarge {
            message: format!("{count} prompts in one request; the limit is {max_prompts}"),
            param: Some("prompt".into()),
        });
    }
    let prompts = match v {
        Value::String(t) => vec![text_prompt(t, "prompt")?],
        Value::Array(items) if items.is_empty() => {
            return Err(ApiError::invalid("prompt", "must not be an empty list"))
        }
        Value::Array(items) if items.iter().all(Value::is_string) => items
            .iter()
            .enumerate()
            .map(|(i, t)| text_prompt(t.as_str().unwrap_or_default(), &format!("prompt[{i}]")))
            .collect::<Result<_, _>>()?,
        Value::Array(items) if items.iter().all(Value::is_number) => {
            vec![id_prompt(ids_of(items, "prompt")?)?]
        }
        Value::Array(items) if items.iter().all(Value::is_array) => items
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let row = row.as_array().map(Vec::as_slice).unwrap_or_default();
                id_prompt(ids_of(row, &format!("prompt[{i}]"))?)
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(shape()),
    };
    for (i, p) in prompts.iter().enumerate() {
        if p.ids.is_empty() {
            return Err(ApiError::invalid(
                format!("prompt[{i}]"),
                "has no tokens; a prompt needs at least one",
            ));
        }
    }
    Ok(prompts)
}

pub(super) fn parse_stop(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let stops = match v {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| ApiError::invalid(format!("stop[{i}]"), "must be a string"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::invalid(
                "stop",
                "must be a string or a list of strings",
            ))
        }
    };
    if stops.len() > MAX_STOP_STRINGS {
        return Err(ApiError::invalid(
            "stop",
            format!("at most {MAX_STOP_STRINGS} stop strings"),
        ));
    }
    if stops.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "stop strings must not be empty"));
    }
    Ok(stops)
}

/// A validated request, ready for the engine.
pub(super) struct Plan {
    pub(super) prompts: Vec<Prompt>,
    pub(super) n: usize,
    pub(super) max_tokens: usize,
    pub(super) echo: bool,
    pub(super) logprobs: Option<usize>,
    pub(super) stream: bool,
    pub(super) include_usage: bool,
    pub(super) reqs: Vec<GenerateRequest>,
}

pub(super) fn plan(r: CompletionRequest, s: &Served, state: &AppState) -> Result<Plan, ApiError> {
    let limits = &state.limits;
    check_model(r.model.as_deref(), s)?;
    let prompts = parse_prompts(&r.prompt, s, limits.max_prompts)?;
    let n = r.n.unwrap_or(1);
    if n == 0 || n > limits.max_n {
        return Err(ApiError::invalid(
            "n",
            format!("must be between 1 and {}", limits.max_n),
        ));
    }
    let temperature = r.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid("temperature", "must be between 0 and 2"));
    }
    let top_p = r.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid("top_p", "must be in (0, 1]"));
    }
    if let Some(lp) = r.logprobs {
        if lp > limits.max_logprobs {
            return Err(ApiError::invalid(
                "logprobs",
                format!("must be between 0 and {}", limits.max_logprobs),
            ));
        }
    }
    let stop = parse_stop(r.stop.as_ref())?;
    let max_tokens = r.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    let echo = r.echo.unwrap_or(false);
    let stream = r.stream.unwrap_or(false);
    if r.stream_options.is_some() && !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "is only allowed when stream is true",
        ));
    }
    let ctx = s.model.spec().context_length;
    for (i, p) in prompts.iter().enumerate() {
        if p.ids.len() > ctx {
            return Err(ApiError::invalid(
                format!("prompt[{i}]"),
                format!(
                    "has {} tokens, more than the model's context length {ctx}",
                    p.ids.len()
                ),
            ));
        }
        // `ids.len() <= ctx` here, so the subtraction cannot wrap (an addition could).
        if max_tokens > ctx - p.ids.len() {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "prompt[{i}] has {} tokens; with max_tokens {max_tokens} that exceeds the \
                     model's context length {ctx}",
                    p.ids.len()
                ),
            ));
        }
    }
    let mut reqs = Vec::new();
    if max_tokens > 0 {
        for (pi, p) in prompts.iter().enumerate() {
            for j in 0..n {
                let choice = (pi * n + j) as u64;
                reqs.push(GenerateRequest {
                    prompt: p.ids.clone(),
                    max_new_tokens: max_tokens,
                    sampling: SamplingParams {
                        temperature,
                        top_p,
                        top_k: r.top_k.unwrap_or(0),
                        seed: r.seed.map(|s| (s as u64).wrapping_add(choice)),
                    },
                    stop: stop.clone(),
                    banned_ids: Vec::new(),
                    stop_at_eos: true,
                    top_logprobs: r.logprobs,
                    filter: state.guard_filter(),
                });
            }
        }
    }
    Ok(Plan {
        prompts,
        n,
        max_tokens,
        echo,
        logprobs: r.logprobs,
        stream,
        include_usage: r.stream_options.is_some_and(|o| o.include_usage),
        reqs,
    })
}
