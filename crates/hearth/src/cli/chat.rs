//! `hearth chat`: OpenAI chat completions through the gateway's inference route, one-shot or
//! as an interactive session whose answers stream as they are generated.

use std::io::{IsTerminal, Write};

use anyhow::{anyhow, bail};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;

use super::client::{transport_error, ApiError, Ref};
use super::Ctx;

#[derive(clap::Args)]
pub struct ChatArgs {
    /// The model: a model id or name, a deployed model's name, or MODEL#DEPLOYMENT.
    model: String,
    /// A message to send; the answer is printed and the command ends. Without one (and
    /// without --message), an interactive session starts.
    prompt: Vec<String>,
    /// The message to send (instead of the positional prompt).
    #[arg(long, short = 'm', conflicts_with = "prompt")]
    message: Option<String>,
    /// A system prompt that opens the conversation.
    #[arg(long)]
    system: Option<String>,
    /// The most tokens an answer may have.
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Sampling temperature (0 picks the most likely token every time).
    #[arg(long)]
    temperature: Option<f64>,
    /// Print each answer when complete instead of as it is generated.
    #[arg(long)]
    no_stream: bool,
}

/// The model as the inference route takes it: bare ids become model names in the account.
async fn model_name(ctx: &Ctx, model: &str) -> anyhow::Result<String> {
    if model.contains('/') || model.contains('#') {
        return Ok(model.to_string());
    }
    Ref::parse(model, "models")?.name(&ctx.api, "models").await
}

pub async fn run(ctx: &Ctx, args: ChatArgs) -> anyhow::Result<()> {
    let model = model_name(ctx, &args.model).await?;
    let mut messages: Vec<Value> = Vec::new();
    if let Some(s) = &args.system {
        messages.push(json!({"role": "system", "content": s}));
    }
    let one_shot = args.message.clone().or_else(|| (!args.prompt.is_empty()).then(|| args.prompt.join(" ")));
    if let Some(text) = one_shot {
        messages.push(json!({"role": "user", "content": text}));
        let answer = complete(ctx, &args, &model, &messages).await?;
        if args.no_stream {
            println!("{answer}");
        }
        return Ok(());
    }
    repl(ctx, &args, &model, messages).await
}

/// Reads a message per line; `/reset` forgets the conversation, `/exit` (or end of input)
/// ends it. Ctrl-C stops an answer being generated, or ends the session at the prompt.
async fn repl(ctx: &Ctx, args: &ChatArgs, model: &str, mut messages: Vec<Value>) -> anyhow::Result<()> {
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("chatting with {model}; /reset starts over, /exit or Ctrl-D ends");
    }
    let opening = messages.len();
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        let line = tokio::select! {
            l = lines.next_line() => l?,
            _ = tokio::signal::ctrl_c() => None,
        };
        let Some(line) = line else { break };
        let text = line.trim();
        match text {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages.truncate(opening);
                continue;
            }
            _ => {}
        }
        messages.push(json!({"role": "user", "content": text}));
        let answer = tokio::select! {
            a = complete(ctx, args, model, &messages) => a,
            _ = tokio::signal::ctrl_c() => {
                println!();
                eprintln!("(stopped)");
                messages.pop();
                continue;
            }
        };
        match answer {
            Ok(a) => {
                if args.no_stream {
                    println!("{a}");
                }
                messages.push(json!({"role": "assistant", "content": a}));
            }
            Err(e) if interactive => {
                // One failed turn does not end a session: the question can be asked again.
                eprintln!("error: {e:#}");
                messages.pop();
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends the conversation and returns the answer. When streaming, the answer is printed as
/// it arrives (ending with a newline); otherwise the caller prints it.
async fn complete(ctx: &Ctx, args: &ChatArgs, model: &str, messages: &[Value]) -> anyhow::Result<String> {
    let stream = !args.no_stream;
    let mut body = json!({"model": model, "messages": messages, "stream": stream});
    if let Some(n) = args.max_tokens {
        body["max_tokens"] = json!(n);
    }
    if let Some(t) = args.temperature {
        body["temperature"] = json!(t);
    }
    let resp = ctx
        .api
        .http
        .post(ctx.api.url("/inference/v1/chat/completions"))
        .bearer_auth(ctx.api.key()?)
        .json(&body)
        .send()
        .await
        .map_err(|e| transport_error(&ctx.api.base, &e))?;
    let status = resp.status();
    if !status.is_success() {
        let bytes = resp.bytes().await.map_err(|e| transport_error(&ctx.api.base, &e))?;
        return Err(ApiError::from_body(status, &bytes).into());
    }
    if !stream {
        let v: Value = resp.json().await.map_err(|e| anyhow!("reading the answer: {e}"))?;
        return v["choices"][0]["message"]["content"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("the answer has no choices[0].message.content: {v}"));
    }
    // Server-sent events: `data: {chunk}` lines, then `data: [DONE]`.
    let mut answer = String::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut bytes = resp.bytes_stream();
    let mut out = std::io::stdout();
    let mut done = false;
    while let Some(chunk) = bytes.next().await {
        let chunk = chunk.map_err(|e| anyhow!("the answer stream broke off: {e}"))?;
        pending.extend_from_slice(&chunk);
        while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim_end().strip_prefix("data:") else { continue };
            let data = data.trim();
            if data == "[DONE]" {
                done = true;
                break;
            }
            let event: Value =
                serde_json::from_str(data).map_err(|e| anyhow!("an invalid event in the answer stream: {e}"))?;
            if event.get("error").is_some() {
                bail!("the answer stream ended with an error: {}", event["error"]["message"].as_str().unwrap_or("?"));
            }
            if let Some(delta) = event["choices"][0]["delta"]["content"].as_str() {
                answer.push_str(delta);
                let _ = out.write_all(delta.as_bytes());
                let _ = out.flush();
            }
        }
        if done {
            break;
        }
    }
    println!();
    if !done {
        bail!("the answer stream ended before it was complete");
    }
    Ok(answer)
}
