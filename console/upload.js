// @ts-check
// Model files into hearth: the signed-URL upload the CLI uses, from the browser. Each file
// goes up in parts (`Content-Range: bytes START-END/TOTAL`, answered 308 until the last);
// before sending, the console asks where the file stands (`bytes */TOTAL`), so an upload cut
// off by a closed tab or a lost connection resumes where it stopped when started again.

import { Api, ApiError } from "./api.js";

/** Bytes per request: large enough to keep the connection busy, small enough to resume cheaply. */
const PART = 8 * 1024 * 1024;

/**
 * One PUT with upload progress (fetch reports none). Resolves with the status and `Range`.
 * @param {string} url
 * @param {Blob | null} body
 * @param {string} range the Content-Range header
 * @param {(sent: number) => void} onProgress bytes of this body sent so far
 * @returns {Promise<{status: number, range: string | null, text: string}>}
 */
function put(url, body, range, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("PUT", url);
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.setRequestHeader("Content-Range", range);
    xhr.upload.onprogress = (e) => onProgress(e.loaded);
    xhr.onload = () => resolve({ status: xhr.status, range: xhr.getResponseHeader("Range"), text: xhr.responseText });
    xhr.onerror = () => reject(new Error("the connection failed during the upload; start it again to resume"));
    xhr.send(body);
  });
}

/** How many bytes `Range: bytes=0-N` says are stored. @param {string | null} range */
function stored(range) {
  const m = range?.match(/bytes=0-(\d+)/);
  return m ? Number(m[1]) + 1 : 0;
}

/**
 * Sends one file to its signed URL, resuming what is already stored.
 * @param {string} signed the signed URL (only its path and query are used: same origin)
 * @param {File} file
 * @param {(done: number) => void} onProgress bytes of this file stored so far
 */
async function sendFile(signed, file, onProgress) {
  const u = new URL(signed, location.origin);
  const url = u.pathname + u.search;
  const total = file.size;
  let offset = 0;
  if (total > 0) {
    const probe = await put(url, null, `bytes */${total}`, () => {});
    if (probe.status === 200 || probe.status === 201) return onProgress(total);
    if (probe.status === 308) offset = stored(probe.range);
  }
  if (total === 0) {
    const r = await put(url, file, `bytes */0`, () => {});
    if (r.status >= 300) throw new Error(`upload of ${file.name}: HTTP ${r.status} ${r.text}`);
    return onProgress(0);
  }
  while (offset < total) {
    const end = Math.min(offset + PART, total);
    const r = await put(url, file.slice(offset, end), `bytes ${offset}-${end - 1}/${total}`, (sent) => onProgress(offset + sent));
    if (r.status === 308) offset = stored(r.range);
    else if (r.status === 200 || r.status === 201) offset = total;
    else throw new Error(`upload of ${file.name}: ${JSON.parse(r.text || "{}").message ?? `HTTP ${r.status}`}`);
    onProgress(offset);
  }
}

/**
 * Registers `id` (unless it exists and is still being uploaded), uploads `files` and
 * validates them. `onProgress` gets the fraction done and a line to show.
 * @param {Api} api
 * @param {string} id
 * @param {Record<string, any>} model the Model body: kind and details
 * @param {File[]} files named as they go into the model (a folder's files by their path in it)
 * @param {(fraction: number, line: string) => void} onProgress
 */
export async function uploadModel(api, id, model, files, onProgress) {
  try {
    await api.request("POST", "models", { modelId: id, model });
  } catch (e) {
    const existing = e instanceof ApiError && e.status === 409 ? await api.request("GET", `models/${id}`) : null;
    if (!existing || existing.state !== "UPLOADING") throw e;
  }
  /** @param {File} f */
  const nameOf = (f) => (f.webkitRelativePath ? f.webkitRelativePath.split("/").slice(1).join("/") : f.name);
  const sizes = Object.fromEntries(files.map((f) => [nameOf(f), String(f.size)]));
  const { filenameToSignedUrls: urls } = await api.request("POST", `models/${id}:getUploadEndpoint`, { filenameToSize: sizes });
  const total = files.reduce((n, f) => n + f.size, 0) || 1;
  /** @type {Record<string, number>} */
  const done = {};
  for (const f of files) {
    await sendFile(urls[nameOf(f)], f, (n) => {
      done[nameOf(f)] = n;
      const sent = Object.values(done).reduce((a, b) => a + b, 0);
      onProgress(sent / total, `${nameOf(f)}: ${(sent / 1e6).toFixed(1)} of ${(total / 1e6).toFixed(1)} MB`);
    });
  }
  onProgress(1, "validating…");
  await api.request("GET", `models/${id}:validateUpload`);
  onProgress(1, "READY");
}
