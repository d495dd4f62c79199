// @ts-check
// hearth's console: a page per resource, drawn from the public API with the signed-in key.
// Every element is built with `h` (text is never parsed as HTML), pages are chosen by the URL
// hash (#/models, #/deployments, #/playground, #/keys), and the key lives in this tab's
// sessionStorage only.

import { Api, ApiError, shortName } from "./api.js";
import { curlSnippet, openaiSnippet, streamChat } from "./chat.js";
import { lineChart } from "./plot.js";
import { uploadModel } from "./upload.js";

const KEY_STORAGE = "hearth-console-key";

/**
 * Builds an element. `attrs` keys starting with `on` are event listeners; others are
 * attributes (`true` sets a boolean attribute, `false`/null/undefined leaves it out).
 * @param {string} tag
 * @param {Record<string, any>} [attrs]
 * @param {...(Node | string | number | null | undefined | false)} children
 * @returns {HTMLElement}
 */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (v === true) el.setAttribute(k, "");
    else if (v !== false && v !== null && v !== undefined) el.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    el.append(typeof c === "string" || typeof c === "number" ? String(c) : c);
  }
  return el;
}

/** @param {string} id */
function byId(id) {
  const el = document.getElementById(id);
  if (!el) throw new Error(`missing #${id}`);
  return el;
}

/** @param {HTMLElement} form @param {string} name */
function field(form, name) {
  const el = /** @type {HTMLInputElement | null} */ (form.querySelector(`[name="${name}"]`));
  return el ? el.value.trim() : "";
}

/** Shows a message in the page's live region. @param {string} text @param {boolean} [isError] */
function say(text, isError = false) {
  const status = byId("status");
  status.textContent = text;
  status.className = isError ? "status error" : "status";
}

/** @param {unknown} e */
function sayError(e) {
  say(e instanceof ApiError || e instanceof Error ? e.message : String(e), true);
}

/** @param {number} n @param {string} word */
function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

/** @param {string | undefined} t */
function when(t) {
  return t ? new Date(t).toLocaleString() : "";
}

/** @type {Api | null} */
let api = null;
/** @type {import("./api.js").Identity | null} */
let me = null;
/** A page's periodic refresh, stopped when the page changes. @type {number | undefined} */
let refresh;
/** Counts page changes: a page that finishes loading after the next one started is not shown. */
let routeSeq = 0;

/**
 * Shows a page's content unless another page was asked for while it loaded.
 * @param {number} seq `routeSeq` when the page started loading
 * @param {...(Node | string)} nodes
 */
function show(seq, ...nodes) {
  if (seq !== routeSeq) return false;
  byId("main").replaceChildren(...nodes);
  return true;
}

// ---- signing in ------------------------------------------------------------------------

async function signIn(/** @type {string} */ key) {
  const candidate = new Api(key);
  me = await candidate.whoami();
  api = candidate;
  sessionStorage.setItem(KEY_STORAGE, key);
  byId("who").textContent = `${shortName(me.user)} (${me.role}) in account ${me.accountId}`;
  document.body.classList.add("signed-in");
  byId("nav-users").hidden = me.role !== "admin";
  route();
}

function signOut() {
  sessionStorage.removeItem(KEY_STORAGE);
  api = null;
  me = null;
  document.body.classList.remove("signed-in");
  location.hash = "";
  showSignIn();
}

function showSignIn() {
  clearInterval(refresh);
  const form = h(
    "form",
    { class: "card narrow", "aria-labelledby": "signin-title" },
    h("h1", { id: "signin-title" }, "Sign in to hearth"),
    h("label", { for: "signin-key" }, "API key"),
    h("input", { id: "signin-key", name: "key", type: "password", autocomplete: "off", required: true }),
    h("button", { type: "submit" }, "Sign in"),
    h("p", { class: "hint" }, "The key stays in this browser tab; the console uses hearth's public API with it."),
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      await signIn(field(form, "key"));
      say("");
    } catch (e) {
      sayError(e);
    }
  });
  byId("main").replaceChildren(form);
  /** @type {HTMLInputElement} */ (form.querySelector("input")).focus();
}

// ---- pages -------------------------------------------------------------------------------

/** @type {Record<string, () => Promise<void>>} */
const PAGES = {
  models: modelsPage,
  deployments: deploymentsPage,
  playground: playgroundPage,
  metrics: metricsPage,
  keys: keysPage,
  users: usersPage,
};

async function route() {
  if (!api) return showSignIn();
  clearInterval(refresh);
  routeSeq += 1;
  // The first page gets its own address, so following its link later changes nothing.
  if (!location.hash) history.replaceState(null, "", "#/models");
  const page = location.hash.replace(/^#\//, "") || "models";
  for (const link of document.querySelectorAll("nav a")) {
    link.toggleAttribute("aria-current", link.getAttribute("href") === `#/${page}`);
  }
  say("");
  try {
    await (PAGES[page] ?? modelsPage)();
  } catch (e) {
    sayError(e);
  }
}

/**
 * A table of rows, with a caption for screen readers.
 * @param {string} caption
 * @param {string[]} headers
 * @param {(Node | string)[][]} rows
 */
function table(caption, headers, rows) {
  return h(
    "table",
    {},
    h("caption", {}, caption),
    h("thead", {}, h("tr", {}, ...headers.map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, ...rows.map((r) => h("tr", {}, ...r.map((c) => h("td", {}, c))))),
  );
}

/** @param {import("./api.js").Resource} m */
function modelDetails(m) {
  const base = m.baseModelDetails ?? {};
  const peft = m.peftDetails ?? {};
  /** @type {[string, any][]} */
  const facts = [
    ["Name", m.name],
    ["Kind", m.kind],
    ["State", m.state],
    ["Parameters", base.parameterCount],
    ["Context length", m.contextLength],
    ["Architecture", base.modelType],
    ["LoRA rank", peft.r],
    ["LoRA targets", (peft.targetModules ?? []).join(", ")],
    ["LoRA base model", peft.baseModel],
    ["Created", when(m.createTime)],
    ["Status", m.status?.message],
  ];
  return h(
    "dl",
    { class: "details" },
    ...facts.filter(([, v]) => v !== undefined && v !== "").flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v))]),
  );
}

async function modelsPage() {
  if (!api) return;
  const seq = routeSeq;
  const models = await api.listAll("models");
  const detail = h("section", { "aria-live": "polite" });
  const rows = models.map((m) => [
    h("button", { class: "link", onclick: () => detail.replaceChildren(h("h2", {}, shortName(m.name)), modelDetails(m)) }, shortName(m.name)),
    m.kind ?? "",
    m.state ?? "",
    String(m.baseModelDetails?.parameterCount ?? ""),
    String(m.contextLength ?? ""),
    m.peftDetails?.r ? `rank ${m.peftDetails.r}` : "",
    h("button", { class: "danger", "aria-label": `Delete ${shortName(m.name)}`, onclick: () => deleteModel(m) }, "Delete"),
  ]);
  const bases = models.filter((m) => m.state === "READY" && !m.peftDetails);
  if (!show(seq, 
    h("h1", {}, "Models"),
    models.length ? table("Models of the account", ["Model", "Kind", "State", "Parameters", "Context", "LoRA", ""], rows) : h("p", {}, "No models yet."),
    detail,
    h("div", { class: "row" }, uploadForm(bases), importForm(bases)),
  )) return;
}

/**
 * The fields every new model needs: its id and what it is (a base model, or a LoRA of one).
 * @param {string} prefix ids of this form's fields
 * @param {import("./api.js").Resource[]} bases
 */
function newModelFields(prefix, bases) {
  return [
    h("label", { for: `${prefix}-id` }, "Model id"),
    h("input", { id: `${prefix}-id`, name: "id", required: true, pattern: "[a-z][a-z0-9-]*" }),
    h("label", { for: `${prefix}-kind` }, "Kind"),
    h("select", { id: `${prefix}-kind`, name: "kind" },
      h("option", { value: "" }, "base model"),
      ...bases.map((m) => h("option", { value: m.name }, `LoRA of ${shortName(m.name)}`))),
  ];
}

/** @param {HTMLElement} form */
function newModelBody(form) {
  const base = field(form, "kind");
  return base ? { kind: "HF_PEFT_ADDON", peftDetails: { baseModel: base } } : { kind: "HF_BASE_MODEL", baseModelDetails: {} };
}

/** Upload of files or a folder, with a progress bar; started again, it resumes. */
function uploadForm(/** @type {import("./api.js").Resource[]} */ bases) {
  const bar = h("progress", { max: 1, value: 0, "aria-label": "Upload progress" });
  const line = h("p", { class: "hint", "aria-live": "polite" });
  const form = h(
    "form",
    { class: "card", "aria-labelledby": "upload-title" },
    h("h2", { id: "upload-title" }, "Upload a model"),
    ...newModelFields("up", bases),
    h("label", { for: "up-files" }, "Files (a GGUF file, or a checkpoint's files)"),
    h("input", { id: "up-files", name: "files", type: "file", multiple: true }),
    h("label", { for: "up-folder" }, "or a folder"),
    h("input", { id: "up-folder", name: "folder", type: "file", webkitdirectory: true }),
    h("button", { type: "submit" }, "Upload"),
    bar,
    line,
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (!api) return;
    const pick = (/** @type {string} */ n) => Array.from(/** @type {HTMLInputElement} */ (form.querySelector(`[name="${n}"]`)).files ?? []);
    const files = [...pick("files"), ...pick("folder")];
    if (!files.length) return say("Choose files or a folder to upload.", true);
    try {
      await uploadModel(api, field(form, "id"), newModelBody(form), files, (fraction, text) => {
        /** @type {HTMLProgressElement} */ (bar).value = fraction;
        line.textContent = text;
      });
      say(`Uploaded ${field(form, "id")}: READY.`);
      await modelsPage();
    } catch (e) {
      line.textContent = "";
      sayError(e);
    }
  });
  return form;
}

/** Import from a source the server fetches; the model's state is followed until it settles. */
function importForm(/** @type {import("./api.js").Resource[]} */ bases) {
  const line = h("p", { class: "hint", "aria-live": "polite" });
  const form = h(
    "form",
    { class: "card", "aria-labelledby": "import-title" },
    h("h2", { id: "import-title" }, "Import a model"),
    ...newModelFields("imp", bases),
    h("label", { for: "imp-source" }, "Source"),
    h("select", { id: "imp-source", name: "source" },
      h("option", { value: "hf" }, "Hugging Face repository"),
      h("option", { value: "url" }, "URL of a file"),
      h("option", { value: "s3" }, "S3 bucket"),
      h("option", { value: "civitai" }, "Civitai model URL")),
    h("label", { for: "imp-where" }, "Repository, URL, or s3://bucket/path"),
    h("input", { id: "imp-where", name: "where", required: true }),
    h("label", { for: "imp-token" }, "Token (optional)"),
    h("input", { id: "imp-token", name: "token", type: "password", autocomplete: "off" }),
    h("button", { type: "submit" }, "Import"),
    line,
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (!api) return;
    const a = api;
    const id = field(form, "id");
    const where = field(form, "where");
    const token = field(form, "token") || undefined;
    /** @type {Record<string, any>} */
    let source;
    switch (field(form, "source")) {
      case "hf": source = { huggingfaceSource: { repo: where, token } }; break;
      case "url": source = { urlSource: { url: where } }; break;
      case "civitai": source = { civitaiSource: { civitUrl: where, token } }; break;
      default: {
        const m = where.match(/^s3:\/\/([^/]+)\/?(.*)$/);
        if (!m) return say("An S3 source is written s3://bucket/path.", true);
        source = { awsS3Source: { s3Bucket: m[1], s3Path: m[2] || undefined } };
      }
    }
    try {
      await a.request("POST", "models", { modelId: id, model: newModelBody(form) });
      await a.request("POST", `models/${id}:import`, source);
      let m;
      for (;;) {
        m = await a.request("GET", `models/${id}`);
        line.textContent = `${m.state}${m.status?.message ? `: ${m.status.message}` : ""}`;
        if (m.state !== "UPLOADING") break;
        await new Promise((r) => setTimeout(r, 1000));
      }
      const outcome = line.textContent;
      await modelsPage();
      say(m.state === "READY" ? `Imported ${id}: READY.` : `${id}: ${outcome}`, m.state !== "READY");
    } catch (e) {
      sayError(e);
    }
  });
  return form;
}

/** @param {import("./api.js").Resource} m */
async function deleteModel(m) {
  if (!api || !confirm(`Delete model ${shortName(m.name)}?`)) return;
  try {
    await api.request("DELETE", `models/${shortName(m.name)}`);
    say(`Deleted ${shortName(m.name)}.`);
    await modelsPage();
  } catch (e) {
    sayError(e);
  }
}

/** @param {import("./api.js").Resource} d */
function replicas(d) {
  const ready = d.replicaStats?.readyReplicaCount ?? 0;
  return `${ready} ready of ${d.desiredReplicaCount ?? 0} (${d.minReplicaCount ?? 0}–${d.maxReplicaCount ?? 0})`;
}

async function deploymentsPage() {
  if (!api) return;
  const seq = routeSeq;
  const a = api;
  const models = await a.listAll("models");
  const bases = models.filter((m) => m.state === "READY" && !m.peftDetails);
  const slot = h("div");
  const formSlot = h("div");
  const draw = () => drawDeployments(a, slot, models.filter((m) => m.state === "READY" && m.peftDetails), edit);
  const showCreate = () => formSlot.replaceChildren(deploymentForm(a, bases, null, draw, showCreate));
  /** @param {import("./api.js").Resource} d */
  function edit(d) {
    formSlot.replaceChildren(deploymentForm(a, bases, d, draw, showCreate));
    /** @type {HTMLElement | null} */ (formSlot.querySelector("h2"))?.scrollIntoView();
  }
  showCreate();
  if (!show(seq, h("h1", {}, "Deployments"), slot, formSlot)) return;
  await draw();
  // Live state: the table is redrawn every 2 s unless one of its fields is being used.
  refresh = window.setInterval(() => {
    const active = document.activeElement;
    const busy = active && slot.contains(active) && active.tagName !== "BUTTON";
    if (!busy) draw().catch(sayError);
  }, 2000);
}

/** Seconds of a proto duration such as "300s" (empty when unset). @param {string | undefined} d */
function seconds(d) {
  return d ? String(parseFloat(d)) : "";
}

/**
 * The form that creates a deployment, or (given `existing`) updates one with PATCH. It sets
 * what users set: replicas, autoscaling windows and load target, precision, addons, merged
 * mode, LoRAs kept hot, context length, session affinity, speculation (prompt lookup or a
 * draft model) and hot load of model versions.
 * @param {Api} a
 * @param {import("./api.js").Resource[]} bases
 * @param {import("./api.js").Resource | null} existing
 * @param {() => Promise<void>} done called after a successful submit
 * @param {() => void} cancel
 */
function deploymentForm(a, bases, existing, done, cancel) {
  const d = existing ?? {};
  const p = d.autoscalingPolicy ?? {};
  const id = existing ? shortName(existing.name) : "";
  const num = (/** @type {string} */ name, /** @type {string} */ label, /** @type {any} */ value, /** @type {Record<string, any>} */ extra = {}) => [
    h("label", { for: `dep-${name}` }, label),
    h("input", { id: `dep-${name}`, name, type: "number", value: value ?? "", ...extra }),
  ];
  const check = (/** @type {string} */ name, /** @type {string} */ label, /** @type {boolean} */ on) =>
    h("label", { class: "inline" }, h("input", { type: "checkbox", name, checked: on }), ` ${label}`);
  const form = h(
    "form",
    { class: "card", "aria-labelledby": "deployment-form" },
    h("h2", { id: "deployment-form" }, existing ? `Update ${id}` : "Create a deployment"),
    existing ? null : h("label", { for: "dep-id" }, "Deployment id"),
    existing ? null : h("input", { id: "dep-id", name: "id", required: true, pattern: "[a-z][a-z0-9-]*", placeholder: "my-deployment" }),
    h("label", { for: "dep-base" }, "Base model"),
    h("select", { id: "dep-base", name: "base", required: true },
      ...bases.map((m) => h("option", { value: m.name, selected: m.name === d.baseModel }, shortName(m.name)))),
    h("div", { class: "row" },
      h("div", {}, ...num("min", "Minimum replicas", d.minReplicaCount ?? 1, { min: 0 })),
      h("div", {}, ...num("max", "Maximum replicas", d.maxReplicaCount ?? 1, { min: 1 })),
      h("div", {}, ...num("target", "Load target (requests per replica)", p.loadTargets?.default, { min: 0.01, step: "any" })),
    ),
    h("div", { class: "row" },
      h("div", {}, ...num("up", "Scale up after (s)", seconds(p.scaleUpWindow), { min: 0 })),
      h("div", {}, ...num("down", "Scale down after (s)", seconds(p.scaleDownWindow), { min: 0 })),
      h("div", {}, ...num("zero", "Scale to zero after (s idle)", seconds(p.scaleToZeroWindow), { min: 0 })),
    ),
    h("div", { class: "row" },
      h("div", {},
        h("label", { for: "dep-precision" }, "Precision"),
        h("select", { id: "dep-precision", name: "precision" },
          ...[["", "as stored"], ["FP32", "FP32"], ["FP16", "FP16"], ["BF16", "BF16"]].map(([v, t]) => h("option", { value: v, selected: (d.precision ?? "") === v }, t)))),
      h("div", {}, ...num("cached", "LoRAs kept hot per replica", d.numPeftDeviceCached, { min: 1 })),
      h("div", {}, ...num("context", "Maximum context length (tokens)", d.maxContextLength, { min: 1 })),
    ),
    h("div", { class: "row" },
      h("div", {}, ...num("ngram", "Prompt-lookup speculation: n-gram length (empty: off)", d.ngramSpeculationLength, { min: 1, max: 16 })),
      h("div", {}, ...num("drafts", "Most tokens drafted per step", d.draftTokenCount, { min: 1, max: 16 })),
      h("div", {},
        h("label", { for: "dep-draft" }, "Draft model (same tokenizer)"),
        h("select", { id: "dep-draft", name: "draft" },
          h("option", { value: "" }, "none"),
          ...bases.map((m) => h("option", { value: m.name, selected: m.name === d.draftModel }, shortName(m.name))))),
    ),
    h("div", { class: "row" },
      h("div", {},
        h("label", { for: "dep-bucket" }, "Model versions bucket (file:// or s3://; empty: no hot load)"),
        h("input", { id: "dep-bucket", name: "bucket", value: d.hotLoadBucketUrl ?? "", placeholder: "s3://bucket/prefix" })),
      h("div", {},
        h("label", { for: "dep-version" }, "Version to serve (a folder in the bucket)"),
        h("input", { id: "dep-version", name: "version", value: d.targetModelVersion ?? "" })),
    ),
    check("addons", "Allow LoRA addons", d.enableAddons ?? true),
    check("merged", "Merge its one LoRA into the weights (enableHotReloadLatestAddon)", d.enableHotReloadLatestAddon ?? false),
    check("affinity", "Keep a session on one replica (enableSessionAffinity)", d.enableSessionAffinity ?? false),
    h("div", { class: "actions" },
      h("button", { type: "submit" }, existing ? "Update" : "Create"),
      existing ? h("button", { type: "button", class: "danger", onclick: cancel }, "Cancel") : null),
  );
  const checked = (/** @type {string} */ n) => /** @type {HTMLInputElement} */ (form.querySelector(`[name="${n}"]`)).checked;
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    /** @type {Record<string, any>} */
    const body = {
      baseModel: field(form, "base"),
      minReplicaCount: Number(field(form, "min")),
      maxReplicaCount: Number(field(form, "max")),
      enableAddons: checked("addons"),
      enableHotReloadLatestAddon: checked("merged"),
      enableSessionAffinity: checked("affinity"),
    };
    if (existing && body.baseModel === existing.baseModel) delete body.baseModel;
    if (field(form, "precision")) body.precision = field(form, "precision");
    if (field(form, "cached")) body.numPeftDeviceCached = Number(field(form, "cached"));
    if (field(form, "context")) body.maxContextLength = Number(field(form, "context"));
    if (field(form, "ngram")) body.ngramSpeculationLength = Number(field(form, "ngram"));
    if ((field(form, "ngram") || field(form, "draft")) && field(form, "drafts")) body.draftTokenCount = Number(field(form, "drafts"));
    if (field(form, "draft") || existing?.draftModel) body.draftModel = field(form, "draft");
    if (field(form, "bucket")) {
      body.enableHotLoad = true;
      body.hotLoadBucketUrl = field(form, "bucket");
      body.targetModelVersion = field(form, "version");
    } else if (existing?.enableHotLoad) {
      Object.assign(body, { enableHotLoad: false, hotLoadBucketUrl: "", targetModelVersion: "" });
    }
    /** @type {Record<string, any>} */
    const policy = {};
    if (field(form, "up")) policy.scaleUpWindow = `${field(form, "up")}s`;
    if (field(form, "down")) policy.scaleDownWindow = `${field(form, "down")}s`;
    if (field(form, "zero")) policy.scaleToZeroWindow = `${field(form, "zero")}s`;
    if (field(form, "target")) policy.loadTargets = { default: Number(field(form, "target")) };
    if (Object.keys(policy).length) body.autoscalingPolicy = policy;
    try {
      if (existing) {
        await a.request("PATCH", `deployments/${id}`, body);
        say(`Updated ${id}.`);
        cancel();
      } else {
        await a.request("POST", `deployments?deploymentId=${encodeURIComponent(field(form, "id"))}`, body);
        say(`Created ${field(form, "id")}; it becomes READY when a replica is up.`);
      }
      await done();
    } catch (e) {
      sayError(e);
    }
  });
  return form;
}

/**
 * The deployments table with each one's actions and LoRAs.
 * @param {Api} a
 * @param {HTMLElement} slot
 * @param {import("./api.js").Resource[]} addons READY LoRA models that can be loaded
 * @param {(d: import("./api.js").Resource) => void} edit opens the update form for one
 */
async function drawDeployments(a, slot, addons, edit) {
  const [deployments, loaded] = await Promise.all([
    a.listAll("deployments", { showDeleted: "true" }),
    a.listAll("deployedModels"),
  ]);
  const act = async (/** @type {() => Promise<any>} */ f, /** @type {string} */ done) => {
    try {
      await f();
      say(done);
      await drawDeployments(a, slot, addons, edit);
    } catch (e) {
      sayError(e);
    }
  };
  const rows = deployments.map((d) => {
    const id = shortName(d.name);
    const scale = h("input", { type: "number", min: 0, value: d.desiredReplicaCount ?? d.minReplicaCount ?? 0, "aria-label": `Replicas of ${id}`, class: "small" });
    const mine = loaded.filter((l) => l.deployment === d.name);
    const pick = h("select", { "aria-label": `LoRA to load onto ${id}` }, ...addons.map((m) => h("option", { value: m.name }, shortName(m.name))));
    const loras = h(
      "div",
      { class: "loras" },
      ...mine.map((l) =>
        h(
          "span",
          { class: "chip" },
          `${shortName(l.model)}: ${l.state ?? ""} `,
          h("button", { class: "link", "aria-label": `Unload ${shortName(l.model)} from ${id}`, onclick: () => act(() => a.request("DELETE", `deployedModels/${shortName(l.name)}`), `Unloading ${shortName(l.model)}.`) }, "unload"),
        ),
      ),
      d.state === "READY" && addons.length
        ? h("span", {}, pick, h("button", { onclick: () => act(() => a.request("POST", `deployedModels${d.enableHotReloadLatestAddon && mine.length ? "?replaceMergedAddon=true" : ""}`, { model: /** @type {HTMLSelectElement} */ (pick).value, deployment: d.name }), d.enableHotReloadLatestAddon ? "Merging the LoRA into the weights." : "Loading the LoRA.") }, d.enableHotReloadLatestAddon ? "Merge LoRA" : "Load LoRA"))
        : null,
    );
    const deleted = d.state === "DELETED" || d.state === "DELETING";
    return [
      id,
      shortName(d.baseModel),
      h("span", { class: `state state-${(d.state ?? "").toLowerCase()}`, "data-deployment": id }, d.state ?? ""),
      replicas(d),
      `${d.precision ?? ""}${d.enableHotReloadLatestAddon ? " · merged" : ""}${d.activeModelVersion ? ` · version ${d.activeModelVersion}` : ""}${d.draftModel ? ` · draft ${shortName(d.draftModel)}` : ""}`,
      h("div", {}, d.status?.message ?? "", loras),
      deleted
        ? h("button", { onclick: () => act(() => a.request("POST", `deployments/${id}:undelete`, {}), `Undeleting ${id}.`) }, "Undelete")
        : h(
            "div",
            { class: "actions" },
            scale,
            h("button", { "aria-label": `Edit ${id}`, onclick: () => edit(d) }, "Edit"),
            h("button", { "aria-label": `Scale ${id}`, onclick: () => act(() => a.request("PATCH", `deployments/${id}:scale`, { replicaCount: Number(/** @type {HTMLInputElement} */ (scale).value) }), `Scaling ${id}.`) }, "Scale"),
            h("button", { class: "danger", "aria-label": `Delete ${id}`, onclick: () => confirm(`Delete deployment ${id}?`) && act(() => a.request("DELETE", `deployments/${id}`), `Deleting ${id}.`) }, "Delete"),
          ),
    ];
  });
  slot.replaceChildren(
    deployments.length
      ? table("Deployments of the account, refreshed every 2 seconds", ["Deployment", "Base model", "State", "Replicas", "Precision", "Status and LoRAs", ""], rows)
      : h("p", {}, "No deployments yet."),
  );
}

async function playgroundPage() {
  if (!api) return;
  const seq = routeSeq;
  const a = api;
  /** @type {{data?: {id: string}[]}} */
  const served = await a.request("GET", "/inference/v1/models");
  const ids = (served.data ?? []).map((m) => m.id);
  const options = () => ids.map((id) => h("option", { value: id }, id));
  const form = h(
    "form",
    { class: "card", "aria-labelledby": "playground-title" },
    h("h1", { id: "playground-title" }, "Playground"),
    h("div", { class: "row" },
      h("div", {}, h("label", { for: "pg-model-a" }, "Model"), h("select", { id: "pg-model-a", name: "modelA" }, ...options())),
      h("div", {}, h("label", { for: "pg-model-b" }, "Compare with (optional)"), h("select", { id: "pg-model-b", name: "modelB" }, h("option", { value: "" }, "none"), ...options())),
    ),
    h("label", { for: "pg-system" }, "System prompt"),
    h("textarea", { id: "pg-system", name: "system", rows: 2 }),
    h("label", { for: "pg-message" }, "Message"),
    h("textarea", { id: "pg-message", name: "message", rows: 3, required: true }),
    h("div", { class: "row" },
      h("div", {}, h("label", { for: "pg-temperature" }, "Temperature"), h("input", { id: "pg-temperature", name: "temperature", type: "number", min: 0, max: 2, step: 0.1, value: 0 })),
      h("div", {}, h("label", { for: "pg-top-p" }, "Top p"), h("input", { id: "pg-top-p", name: "topP", type: "number", min: 0, max: 1, step: 0.05, value: 1 })),
      h("div", {}, h("label", { for: "pg-max" }, "Max tokens"), h("input", { id: "pg-max", name: "maxTokens", type: "number", min: 1, value: 64 })),
    ),
    h("button", { type: "submit" }, "Send"),
  );
  const outputs = h("div", { class: "row answers" });
  const snippets = h("div");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const models = [field(form, "modelA"), field(form, "modelB")].filter(Boolean);
    /** @type {import("./chat.js").Message[]} */
    const messages = [];
    if (field(form, "system")) messages.push({ role: "system", content: field(form, "system") });
    messages.push({ role: "user", content: field(form, "message") });
    const request = (/** @type {string} */ model) => ({
      model,
      messages,
      temperature: Number(field(form, "temperature")),
      top_p: Number(field(form, "topP")),
      max_tokens: Number(field(form, "maxTokens")),
    });
    outputs.replaceChildren();
    await Promise.all(
      models.map(async (model) => {
        const text = h("output", { class: "answer", "aria-live": "polite" });
        const stats = h("p", { class: "stats" }, "waiting for the first token…");
        outputs.append(h("section", { class: "card" }, h("h2", {}, model), text, stats));
        try {
          const r = await streamChat(a.key, request(model), (t) => (text.textContent = t));
          const rate = r.completionTokens && r.ttftMs !== null ? (r.completionTokens / ((r.totalMs - r.ttftMs) / 1000 || 1)).toFixed(1) : "";
          stats.textContent = `first token ${r.ttftMs === null ? "—" : (r.ttftMs / 1000).toFixed(2) + " s"} · prompt ${r.promptTokens ?? "?"} tokens · answer ${r.completionTokens ?? "?"} tokens${rate ? ` · ${rate} tokens/s` : ""} · finish ${r.finishReason ?? "?"}`;
        } catch (e) {
          stats.textContent = "";
          text.textContent = e instanceof Error ? e.message : String(e);
          text.classList.add("error");
        }
      }),
    );
    const first = request(models[0] ?? "");
    const snippet = (/** @type {string} */ title, /** @type {string} */ code) =>
      h("details", {}, h("summary", {}, title), h("pre", {}, code),
        h("button", { type: "button", onclick: () => navigator.clipboard?.writeText(code).then(() => say("Copied.")) }, "Copy"));
    snippets.replaceChildren(
      snippet("This request with curl", curlSnippet(location.origin, first)),
      snippet("This request with the openai client", openaiSnippet(location.origin, first)),
    );
  });
  if (!show(seq, form, outputs, snippets, ids.length ? "" : h("p", {}, "No deployment is serving yet: create one first."))) return;
}

/** Per deployment and model (base or LoRA): the last hour, by minute, refreshed every 10 s. */
async function metricsPage() {
  if (!api) return;
  const seq = routeSeq;
  const a = api;
  const slot = h("div");
  if (!show(seq, h("h1", {}, "Metrics"), h("p", { class: "hint" }, "The last hour of requests through this gateway, by minute."), slot)) return;
  const draw = async () => {
    /** @type {{series: {deployment: string, model: string, adapter: boolean, points: Record<string, any>[]}[]}} */
    const m = await a.request("GET", "inferenceMetrics");
    const to = Date.now();
    const from = to - 3600 * 1000;
    /** @param {Record<string, any>[]} points @param {string} key @param {string} label */
    const line = (points, key, label) => ({
      label,
      points: points.filter((p) => typeof p[key] === "number").map((p) => ({ t: Date.parse(p.time) + 30_000, v: p[key] })),
    });
    slot.replaceChildren(
      ...(m.series.length ? [] : [h("p", {}, "No requests in the last hour.")]),
      ...m.series.map((s) =>
        h(
          "section",
          { class: "card", "aria-label": `${shortName(s.model)} on ${shortName(s.deployment)}` },
          h("h2", {}, `${shortName(s.model)}${s.adapter ? " (LoRA)" : ""} on ${shortName(s.deployment)}`),
          h("p", { class: "hint" }, `${plural(s.points.reduce((n, p) => n + p.requests, 0), "request")}, ${plural(s.points.reduce((n, p) => n + p.completionTokens, 0), "generated token")} in the hour`),
          h(
            "div",
            { class: "charts" },
            lineChart("Requests per minute", [line(s.points, "requests", "requests")], "", from, to),
            lineChart("Generated tokens per second", [line(s.points, "tokensPerSecond", "tokens/s")], "", from, to),
            lineChart("Time to first token", [line(s.points, "timeToFirstTokenP50", "p50"), line(s.points, "timeToFirstTokenP95", "p95")], "s", from, to),
            lineChart("Time per output token", [line(s.points, "timePerOutputTokenP50", "p50"), line(s.points, "timePerOutputTokenP95", "p95")], "s", from, to),
          ),
        ),
      ),
    );
  };
  await draw();
  refresh = window.setInterval(() => draw().catch(sayError), 10_000);
}

/** The signed-in user's keys, and a form that shows a new key once. */
async function keysPage() {
  if (!api || !me) return;
  const seq = routeSeq;
  const a = api;
  const user = shortName(me.user);
  const keys = await a.listAll(`users/${user}/apiKeys`);
  const fresh = h("div", { "aria-live": "polite" });
  const rows = keys.map((k) => [
    k.displayName ?? "",
    h("code", {}, `${k.prefix ?? ""}…`),
    when(k.createTime),
    when(k.expireTime) || "never",
    h("button", {
      class: "danger",
      "aria-label": `Revoke key ${k.displayName} (${k.prefix})`,
      onclick: async () => {
        if (!confirm(`Revoke the key ${k.displayName} (${k.prefix}…)? Requests with it fail from now on.`)) return;
        try {
          await a.request("POST", `users/${user}/apiKeys:delete`, { keyId: k.keyId });
          say(`Revoked ${k.displayName}.`);
          await keysPage();
        } catch (e) {
          sayError(e);
        }
      },
    }, "Revoke"),
  ]);
  const form = h(
    "form",
    { class: "card", "aria-labelledby": "new-key" },
    h("h2", { id: "new-key" }, "Create a key"),
    h("label", { for: "key-name" }, "Name"),
    h("input", { id: "key-name", name: "name", placeholder: "laptop" }),
    h("label", { for: "key-expiry" }, "Expires (optional)"),
    h("input", { id: "key-expiry", name: "expiry", type: "datetime-local" }),
    h("button", { type: "submit" }, "Create key"),
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    /** @type {Record<string, any>} */
    const apiKey = { displayName: field(form, "name") };
    if (field(form, "expiry")) apiKey.expireTime = new Date(field(form, "expiry")).toISOString();
    try {
      const created = await a.request("POST", `users/${user}/apiKeys`, { apiKey });
      await keysPage();
      byId("fresh-key-slot").replaceChildren(
        h("div", { class: "card notice", role: "status" },
          h("p", {}, "Your new key. It is shown this once: copy it now."),
          h("code", { id: "fresh-key" }, created.key),
          h("button", { onclick: () => navigator.clipboard?.writeText(created.key) }, "Copy")),
      );
    } catch (e) {
      sayError(e);
    }
  });
  fresh.id = "fresh-key-slot";
  if (!show(seq, 
    h("h1", {}, `API keys of ${user}`),
    fresh,
    keys.length ? table("Your API keys", ["Name", "Prefix", "Created", "Expires", ""], rows) : h("p", {}, "No keys of your own yet."),
    form,
  )) return;
}

/** Admins: the account's users, and a form to add one. */
async function usersPage() {
  if (!api) return;
  const seq = routeSeq;
  const a = api;
  const users = await a.listAll("users");
  const form = h(
    "form",
    { class: "card", "aria-labelledby": "new-user" },
    h("h2", { id: "new-user" }, "Add a user"),
    h("label", { for: "user-id" }, "User id"),
    h("input", { id: "user-id", name: "id", required: true, pattern: "[a-z][a-z0-9-]*" }),
    h("label", { for: "user-email" }, "Email"),
    h("input", { id: "user-email", name: "email", type: "email" }),
    h("label", { for: "user-role" }, "Role"),
    h("select", { id: "user-role", name: "role" }, h("option", { value: "user" }, "user"), h("option", { value: "admin" }, "admin")),
    h("button", { type: "submit" }, "Add user"),
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    /** @type {Record<string, any>} */
    const body = { role: field(form, "role") };
    if (field(form, "email")) body.email = field(form, "email");
    try {
      await a.request("POST", `users?userId=${encodeURIComponent(field(form, "id"))}`, body);
      say(`Added ${field(form, "id")}.`);
      await usersPage();
    } catch (e) {
      sayError(e);
    }
  });
  if (!show(seq, 
    h("h1", {}, "Users"),
    table("Users of the account", ["User", "Role", "Email", "Created"], users.map((u) => [shortName(u.name), u.role ?? "", u.email ?? "", when(u.createTime)])),
    form,
  )) return;
}

// ---- start -------------------------------------------------------------------------------

byId("sign-out").addEventListener("click", signOut);
window.addEventListener("hashchange", () => route());
const saved = sessionStorage.getItem(KEY_STORAGE);
if (saved) signIn(saved).catch(() => showSignIn());
else showSignIn();
