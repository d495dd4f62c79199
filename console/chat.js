// @ts-check
// Streaming chat for the playground: OpenAI's chat completions over server-sent events, with
// the time to the first token and the token counts the usage chunk reports.

/**
 * @typedef {{role: string, content: string}} Message
 * @typedef {{model: string, messages: Message[], temperature: number, max_tokens: number, top_p: number}} ChatRequest
 * @typedef {{text: string, ttftMs: number | null, totalMs: number, promptTokens: number | null,
 *            completionTokens: number | null, finishReason: string | null}} ChatResult
 */

/**
 * Sends `request` with `stream: true` and calls `onText` with the text so far as it grows.
 * @param {string} key
 * @param {ChatRequest} request
 * @param {(text: string) => void} onText
 * @param {AbortSignal} [signal]
 * @returns {Promise<ChatResult>}
 */
export async function streamChat(key, request, onText, signal) {
  const started = performance.now();
  const response = await fetch("/inference/v1/chat/completions", {
    method: "POST",
    headers: { Authorization: `Bearer ${key}`, "Content-Type": "application/json" },
    body: JSON.stringify({ ...request, stream: true, stream_options: { include_usage: true } }),
    signal,
  });
  if (!response.ok || !response.body) {
    const body = await response.json().catch(() => ({}));
    throw new Error(body?.error?.message ?? body?.message ?? `HTTP ${response.status}`);
  }
  /** @type {ChatResult} */
  const result = { text: "", ttftMs: null, totalMs: 0, promptTokens: null, completionTokens: null, finishReason: null };
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message ?? "the stream failed");
        const choice = chunk.choices?.[0];
        const delta = choice?.delta?.content ?? "";
        if (delta) {
          if (result.ttftMs === null) result.ttftMs = performance.now() - started;
          result.text += delta;
          onText(result.text);
        }
        if (choice?.finish_reason) result.finishReason = choice.finish_reason;
        if (chunk.usage) {
          result.promptTokens = chunk.usage.prompt_tokens ?? null;
          result.completionTokens = chunk.usage.completion_tokens ?? null;
        }
      }
    }
  }
  result.totalMs = performance.now() - started;
  return result;
}

/**
 * The same request as a shell command, with the key left as a variable.
 * @param {string} origin
 * @param {ChatRequest} request
 */
export function curlSnippet(origin, request) {
  const body = JSON.stringify(request, null, 2).replaceAll("'", "'\\''");
  return `curl ${origin}/inference/v1/chat/completions \\\n  -H "Authorization: Bearer $HEARTH_API_KEY" \\\n  -H "Content-Type: application/json" \\\n  -d '${body}'`;
}

/**
 * The same request with the official `openai` Python client.
 * @param {string} origin
 * @param {ChatRequest} request
 */
export function openaiSnippet(origin, request) {
  const messages = request.messages.map((m) => `        {"role": ${JSON.stringify(m.role)}, "content": ${JSON.stringify(m.content)}},`).join("\n");
  return [
    "import os",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url="${origin}/inference/v1", api_key=os.environ["HEARTH_API_KEY"])`,
    "response = client.chat.completions.create(",
    `    model=${JSON.stringify(request.model)},`,
    "    messages=[",
    messages,
    "    ],",
    `    temperature=${request.temperature},`,
    `    top_p=${request.top_p},`,
    `    max_tokens=${request.max_tokens},`,
    ")",
    "print(response.choices[0].message.content)",
  ].join("\n");
}
