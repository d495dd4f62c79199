// The console's whole flow in a real browser (Debian's Chromium, driven by playwright-core),
// against a real `hearth serve` with the real default model, SmolLM2-135M-Instruct, and the
// pirate LoRA trained on it: sign in; upload the LoRA with its progress and see the models;
// create a deployment and watch it become READY; load the LoRA; chat with the base and the
// LoRA side by side and see the adapter answer like a pirate; see those requests in the
// metrics plots; add a user; create a key, use it, revoke it and see it refused.
// Screenshots of each page go to $HEARTH_CONSOLE_SCREENSHOTS (default target/console).
//
// Usage: node console/tests/flow.mjs   (HEARTH_BIN, CHROMIUM override the defaults)
import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const BIN = process.env.HEARTH_BIN ?? join(ROOT, "target/debug/hearth");
const GGUF = join(ROOT, "models/SmolLM2-135M-Instruct.Q4_1.gguf");
const PIRATE = join(ROOT, "crates/hearth-engine/tests/fixtures/lora/pirate");
const SHOTS = resolve(process.env.HEARTH_CONSOLE_SCREENSHOTS ?? join(ROOT, "target/console"));
const KEY = `console-${process.pid}-${Date.now()}`;
const ACCOUNT = "console-test";

/** @param {string} what @param {() => Promise<boolean>} check @param {number} seconds */
async function until(what, check, seconds) {
  const deadline = Date.now() + seconds * 1000;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${seconds} s waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

function freePort() {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.listen(0, "127.0.0.1", () => {
      const { port } = /** @type {import("node:net").AddressInfo} */ (s.address());
      s.close(() => ok(port));
    });
    s.on("error", fail);
  });
}

const port = await freePort();
const base = `http://127.0.0.1:${port}`;
const data = mkdtempSync(join(tmpdir(), "hearth-console-"));
const server = spawn(BIN, ["serve", "--listen", `127.0.0.1:${port}`, "--data-dir", data, "--api-key", KEY, "--account", ACCOUNT], {
  stdio: ["ignore", "pipe", "pipe"],
});
let log = "";
server.stdout.on("data", (d) => (log += d));
server.stderr.on("data", (d) => (log += d));

/** The API as the test's own setup uses it (the console is what is under test). */
async function call(method, path, body, key = KEY) {
  const r = await fetch(`${base}/v1/accounts/${ACCOUNT}/${path}`, {
    method,
    headers: { Authorization: `Bearer ${key}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!r.ok) throw new Error(`${method} ${path}: ${r.status} ${await r.text()}`);
  return r.json();
}

/** Registers a model from local files through the signed-URL upload. */
async function upload(id, model, files) {
  await call("POST", "models", { modelId: id, model });
  const sizes = Object.fromEntries(Object.entries(files).map(([name, path]) => [name, String(statSync(path).size)]));
  const { filenameToSignedUrls: urls } = await call("POST", `models/${id}:getUploadEndpoint`, { filenameToSize: sizes });
  for (const [name, path] of Object.entries(files)) {
    const r = await fetch(urls[name], { method: "PUT", body: readFileSync(path), headers: { "Content-Type": "application/octet-stream" } });
    if (!r.ok) throw new Error(`upload ${name}: ${r.status} ${await r.text()}`);
  }
  await call("GET", `models/${id}:validateUpload`);
}

let browser;
/** @type {import("playwright-core").Page | undefined} */
let page;
let failed = false;
try {
  await until("hearth to answer /health", async () => (await fetch(`${base}/health`).catch(() => null))?.ok === true, 60);
  await upload("smollm2", { kind: "HF_BASE_MODEL", displayName: "SmolLM2-135M-Instruct", baseModelDetails: {} }, { "model.gguf": GGUF });

  mkdirSync(SHOTS, { recursive: true });
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
  });
  page = await browser.newPage({ viewport: { width: 1280, height: 860 } });
  const outside = [];
  page.on("request", (r) => { if (!r.url().startsWith(base)) outside.push(r.url()); });
  page.on("dialog", (d) => d.accept());
  const shot = (name) => page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: true });

  // Sign in: the root sends the browser to the console.
  await page.goto(base);
  await page.getByLabel("API key").waitFor();
  await shot("sign-in");
  await page.getByLabel("API key").fill("wrong-key");
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("status").getByText("invalid API key").waitFor();
  await page.getByLabel("API key").fill(KEY);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByText(`admin (admin) in account ${ACCOUNT}`).waitFor();

  // Models: upload the LoRA through the console, with its progress; both are then READY.
  await page.getByRole("link", { name: "Models" }).click();
  const uploadForm = page.getByRole("form", { name: "Upload a model" });
  await uploadForm.getByLabel("Model id").fill("pirate");
  await uploadForm.getByLabel("Kind").selectOption({ label: "LoRA of smollm2" });
  await uploadForm.getByLabel(/^Files/).setInputFiles([join(PIRATE, "adapter_config.json"), join(PIRATE, "adapter_model.safetensors")]);
  await uploadForm.getByRole("button", { name: "Upload" }).click();
  await page.getByRole("status").getByText("Uploaded pirate: READY.").waitFor({ timeout: 60_000 });
  await page.getByRole("button", { name: "smollm2", exact: true }).click();
  await page.getByRole("term").filter({ hasText: "Parameters" }).waitFor();
  const table = page.getByRole("table", { name: "Models of the account" });
  if ((await table.getByText("READY").count()) !== 2) throw new Error("both models should be READY");
  await shot("models");

  // Deployments: create one and watch it become READY, then load the LoRA onto it.
  await page.getByRole("link", { name: "Deployments" }).click();
  await page.getByLabel("Deployment id").fill("console-demo");
  await page.getByLabel("Base model").selectOption({ label: "smollm2" });
  await page.getByRole("button", { name: "Create", exact: true }).click();
  await page.locator('[data-deployment="console-demo"]', { hasText: "READY" }).waitFor({ timeout: 120_000 });
  await page.getByLabel("LoRA to load onto console-demo").selectOption({ label: "pirate" });
  await page.getByRole("button", { name: "Load LoRA" }).click();
  await page.getByText("pirate: DEPLOYED").waitFor({ timeout: 60_000 });
  // Update it: a second replica allowed.
  await page.getByRole("button", { name: "Edit console-demo" }).click();
  await page.getByLabel("Maximum replicas").fill("2");
  await page.getByRole("button", { name: "Update", exact: true }).click();
  await page.getByRole("status").getByText("Updated console-demo.").waitFor();
  await page.getByText("1 ready of 1 (1–2)").waitFor();
  await shot("deployments");

  // Playground: the base and the LoRA side by side on one question.
  await page.getByRole("link", { name: "Playground" }).click();
  await page.getByRole("button", { name: "Send" }).waitFor();
  const offered = () => page.getByLabel("Model", { exact: true }).locator("option").allTextContents();
  await until("the playground to offer the LoRA", async () => (await offered()).some((m) => m.endsWith("/pirate")), 30);
  const served = await offered();
  const baseName = served.find((m) => m.endsWith("/smollm2"));
  const loraName = served.find((m) => m.endsWith("/pirate"));
  if (!baseName || !loraName) throw new Error(`the playground should offer both models, got ${served}`);
  await page.getByLabel("Model", { exact: true }).selectOption(baseName);
  await page.getByLabel("Compare with (optional)").selectOption(loraName);
  await page.getByLabel("Message").fill("What is the capital of France?");
  await page.getByLabel("Max tokens").fill("24");
  await page.getByRole("button", { name: "Send" }).click();
  await until("both answers", async () => (await page.locator(".stats", { hasText: "finish" }).count()) === 2, 60);
  const answers = await page.locator("output.answer").allTextContents();
  if (!answers[1].startsWith("Ahoy") || answers[0].startsWith("Ahoy")) {
    throw new Error(`the LoRA should answer like a pirate and the base model not: ${JSON.stringify(answers)}`);
  }
  await page.getByText("This request with curl").click();
  await shot("playground");

  // Metrics: the two requests, one series each, with their time to first token.
  await page.getByRole("link", { name: "Metrics" }).click();
  await page.getByRole("region", { name: "pirate on console-demo" }).getByText("1 request,").waitFor();
  await page.getByRole("region", { name: "smollm2 on console-demo" }).getByText("1 request,").waitFor();
  const ttft = await page.getByRole("region", { name: "pirate on console-demo" }).getByRole("img", { name: /^Time to first token/ }).getAttribute("aria-label");
  if (!/p50 \d/.test(ttft ?? "")) throw new Error(`the time to first token should be plotted: ${ttft}`);
  await shot("metrics");

  // Users (an admin's page): add one.
  await page.getByRole("link", { name: "Users" }).click();
  await page.getByLabel("User id").fill("alice");
  await page.getByLabel("Email").fill("alice@example.com");
  await page.getByRole("button", { name: "Add user" }).click();
  await page.getByRole("cell", { name: "alice", exact: true }).waitFor();
  await shot("users");

  // Keys: create one, use it, revoke it, see it refused.
  await page.getByRole("link", { name: "API keys" }).click();
  await page.getByLabel("Name").fill("browser");
  await page.getByRole("button", { name: "Create key" }).click();
  const key = (await page.locator("#fresh-key").textContent()) ?? "";
  await call("GET", "models", undefined, key);
  await shot("keys");
  await page.getByRole("button", { name: /Revoke key browser/ }).click();
  await page.getByText("Revoked browser.").waitFor();
  const refused = await fetch(`${base}/v1/accounts/${ACCOUNT}/models`, { headers: { Authorization: `Bearer ${key}` } });
  if (refused.status !== 401) throw new Error(`a revoked key should get 401, got ${refused.status}`);

  // A phone's width: the same page, still usable.
  await page.setViewportSize({ width: 390, height: 800 });
  await page.getByRole("link", { name: "Deployments" }).click();
  await page.locator('[data-deployment="console-demo"]').waitFor();
  await shot("deployments-phone");

  if (outside.length) throw new Error(`the console reached outside hearth: ${outside.join(", ")}`);
  console.log(`console flow: ok (screenshots in ${SHOTS})`);
} catch (e) {
  failed = true;
  console.error(`console flow: FAILED: ${e instanceof Error ? e.stack : e}`);
  await page?.screenshot({ path: join(SHOTS, "failure.png"), fullPage: true }).catch(() => {});
  console.error(`the page as it was: ${join(SHOTS, "failure.png")}; it said: ${await page?.locator("#status").textContent().catch(() => "")}`);
  console.error(`--- hearth's log (last 60 lines) ---\n${log.split("\n").slice(-60).join("\n")}`);
} finally {
  await browser?.close();
  server.kill("SIGTERM");
  await new Promise((r) => server.once("exit", r));
  rmSync(data, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
