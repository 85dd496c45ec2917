//! The server-sent-event stream of a completion: the frame state machine, stop strings held
//! back until they cannot match, usage and `[DONE]`.
//!
//! Invariants:
//! - Every frame is `data: <json>\n\n`; every completion frame carries the same `id`, `created`
//!   and `system_fingerprint` (the request's version).
//! - Frame order: first, for each choice in order, its echo frame when `echo` is set and a frame
//!   with `finish_reason: "length"` when `max_tokens` is 0; then token frames as the engine
//!   produces them (choices interleave), each choice ending with one frame that holds its
//!   `finish_reason`; then a usage frame (empty `choices`) when `stream_options.include_usage`
//!   is set; then `data: [DONE]`, after which nothing is sent.
//! - Text is sent only once it can no longer change: a tail that could still grow into a stop
//!   string, or an incomplete character (U+FFFD), is held back, so a stop string is never sent.
//! - A failure after the head is sent (an engine error, the engine stopping, a panic) ends the
//!   stream with one `data: {"error": …}` frame in OpenAI's shape; only the usage frame (when
//!   asked for) and `[DONE]` can follow it. A panic is logged and counted in
//!   `lethe_panics_total{component="http"}`.

use super::*;

/// The stream's next frame. The response head is already sent, so the panic boundary of the
/// middleware cannot answer 500 any more: a panic here ends the stream with an error event and
/// `[DONE]`, and is counted like one in a handler.
pub(super) async fn next_frame(
    mut st: Stream,
    state: &AppState,
) -> Option<(Result<web::Bytes, actix_web::Error>, Option<Stream>)> {
    use futures_util::FutureExt;
    match std::panic::AssertUnwindSafe(st.next()).catch_unwind().await {
        Ok(frame) => frame.map(|b| (Ok(b), Some(st))),
        Err(payload) => {
            state.metrics.panics.with_label_values(&["http"]).inc();
            let message = crate::supervise::panic_message(payload.as_ref());
            tracing::error!(panic = %message, "a completion stream panicked; it ends with an error event");
            let body = serde_json::json!({"error": {
                "message": "internal error while streaming (logged)", "type": "server_error",
                "param": null, "code": "internal_error"}});
            let frames = format!("data: {body}\n\ndata: [DONE]\n\n");
            Some((Ok(web::Bytes::from(frames)), None))
        }
    }
}

/// Per-choice streaming state.
#[derive(Default)]
pub(super) struct StreamChoice {
    pub(super) tokens: Vec<u32>,
    /// Text already sent (without the echoed prompt).
    pub(super) sent: String,
    pub(super) offset: usize,
}

/// The server-sent-event stream of one completion.
pub(super) struct Stream {
    pub(super) served: Arc<Served>,
    pub(super) id: String,
    pub(super) created: u64,
    pub(super) logprobs: bool,
    pub(super) stop: Vec<String>,
    pub(super) include_usage: bool,
    pub(super) usage: Usage,
    pub(super) choices: Vec<StreamChoice>,
    pub(super) rx: Option<mpsc::UnboundedReceiver<RowEvent>>,
    pub(super) left: usize,
    pub(super) out: VecDeque<web::Bytes>,
    pub(super) finished: bool,
}

impl Stream {
    pub(super) fn new(
        served: Arc<Served>,
        id: String,
        plan: Plan,
        prompt_lps: Vec<Vec<f32>>,
        rx: Option<mpsc::UnboundedReceiver<RowEvent>>,
    ) -> Result<Self, ApiError> {
        let total = plan.prompts.len() * plan.n;
        let mut st = Stream {
            id,
            created: unix_now(),
            logprobs: plan.logprobs.is_some(),
            stop: plan
                .reqs
                .first()
                .map(|r| r.stop.clone())
                .unwrap_or_default(),
            include_usage: plan.include_usage,
            usage: Usage {
                prompt_tokens: plan.prompts.iter().map(|p| p.ids.len()).sum(),
                ..Usage::default()
            },
            choices: (0..total).map(|_| StreamChoice::default()).collect(),
            rx,
            left: plan.reqs.len(),
            out: VecDeque::new(),
            finished: false,
            served,
        };
        for index in 0..total {
            let p = &plan.prompts[index / plan.n];
            if plan.echo {
                let mut lp = st.logprobs.then(Logprobs::default);
                if let Some(lp) = lp.as_mut() {
                    let offset = &mut st.choices[index].offset;
                    echo_logprobs(&st.served, p, &prompt_lps[index / plan.n], lp, offset)?;
                }
                st.chunk(index, p.text.clone(), lp, None);
            }
            if plan.max_tokens == 0 {
                st.chunk(index, String::new(), None, Some("length"));
            }
        }
        Ok(st)
    }

    pub(super) fn chunk(
        &mut self,
        index: usize,
        text: String,
        logprobs: Option<Logprobs>,
        finish: Option<&'static str>,
    ) {
        let choice = Choice {
            index,
            text,
            logprobs,
            finish_reason: finish,
        };
        self.push_completion(vec![choice], None);
    }

    /// One `data:` frame holding a completion object with these choices and usage.
    pub(super) fn push_completion(&mut self, choices: Vec<Choice>, usage: Option<Usage>) {
        let c = Completion {
            id: &self.id,
            object: "text_completion",
            created: self.created,
            model: &self.served.name,
            system_fingerprint: &self.served.version,
            choices,
            usage,
        };
        let data = serde_json::to_string(&c).unwrap_or_default();
        self.push_data(&data);
    }

    pub(super) fn push_data(&mut self, data: &str) {
        self.out
            .push_back(web::Bytes::from(format!("data: {data}\n\n")));
    }

    /// The next SSE frame, or `None` after `[DONE]`.
    pub(super) async fn next(&mut self) -> Option<web::Bytes> {
        loop {
            if let Some(b) = self.out.pop_front() {
                return Some(b);
            }
            if self.finished {
                return None;
            }
            if self.left == 0 {
                self.finish();
                continue;
            }
            let ev = match self.rx.as_mut() {
                Some(rx) => rx.recv().await,
                None => None,
            };
            match ev {
                Some(ev) => {
                    if let Err(e) = self.on_event(ev) {
                        self.fail(e);
                    }
                }
                None => self.fail(ApiError::Unavailable("the engine stopped".into())),
            }
        }
    }

    pub(super) fn on_event(&mut self, ev: RowEvent) -> Result<(), ApiError> {
        match ev {
            RowEvent::Token {
                index,
                token,
                logprob,
                top,
            } => {
                let s = self.served.clone();
                let c = &mut self.choices[index];
                c.tokens.push(token);
                let full = s.tokenizer.decode(&c.tokens)?;
                let delta = if full.starts_with(&c.sent) {
                    let end = safe_end(&full, &self.stop);
                    if end > c.sent.len() {
                        full[c.sent.len()..end].to_string()
                    } else {
                        String::new()
                    }
                } else {
                    String::new()
                };
                c.sent.push_str(&delta);
                let mut lp = None;
                if self.logprobs {
                    let mut l = Logprobs::default();
                    let top = (!top.is_empty()).then_some(top.as_slice());
                    l.push(&s, token, logprob, top, &mut c.offset)?;
                    lp = Some(l);
                }
                if !delta.is_empty() || lp.is_some() {
                    self.chunk(index, delta, lp, None);
                }
            }
            RowEvent::Done { index, generation } => {
                self.left -= 1;
                self.usage.completion_tokens += generation.tokens.len();
                let c = &mut self.choices[index];
                let text = generation.text.unwrap_or_default();
                let rest = text
                    .strip_prefix(c.sent.as_str())
                    .unwrap_or_default()
                    .to_string();
                c.sent = text;
                self.chunk(index, rest, None, Some(generation.finish_reason.as_str()));
            }
            RowEvent::Failed { message } => return Err(ApiError::Internal(message)),
        }
        Ok(())
    }

    pub(super) fn fail(&mut self, e: ApiError) {
        if let ApiError::Internal(m) = &e {
            tracing::error!(error = %m, "stream failed");
        }
        let body = serde_json::json!({"error": {
            "message": e.to_string(), "type": e.kind(), "param": null, "code": e.code()}});
        self.push_data(&body.to_string());
        self.left = 0;
        self.finish();
    }

    pub(super) fn finish(&mut self) {
        if self.finished {
            return;
        }
        if self.include_usage {
            self.usage.total_tokens = self.usage.prompt_tokens + self.usage.completion_tokens;
            self.push_completion(Vec::new(), Some(self.usage));
        }
        self.push_data("[DONE]");
        self.finished = true;
    }
}

/// How much of `text` may be sent: everything except a trailing part that could still grow
/// into a stop string, or an incomplete character (U+FFFD from a partial byte sequence).
pub(super) fn safe_end(text: &str, stops: &[String]) -> usize {
    let mut end = text.len();
    for stop in stops {
        for k in (1..stop.len()).rev() {
            if stop.is_char_boundary(k) && text.ends_with(&stop[..k]) {
                end = end.min(text.len() - k);
                break;
            }
        }
    }
    let trimmed = text[..end].trim_end_matches('\u{FFFD}');
    trimmed.len()
}
