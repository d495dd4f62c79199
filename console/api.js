// @ts-check
// hearth's public API as the console uses it: one key, one account, JSON in and out.
// Errors arrive as google.rpc statuses (or OpenAI's shape on inference routes) and are
// thrown as ApiError with the server's own words, which the pages show as they are.

/** An error the API answered with. */
export class ApiError extends Error {
  /**
   * @param {number} status HTTP status
   * @param {string} message the server's message
   * @param {string | number | undefined} code the rpc code or OpenAI error type
   */
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/**
 * @typedef {{accountId: string, user: string, role: string}} Identity
 * @typedef {Record<string, any>} Resource
 */

export class Api {
  /** @param {string} key */
  constructor(key) {
    this.key = key;
    /** @type {string} */
    this.account = "";
  }

  /**
   * Who the key belongs to; also sets the account the other calls use.
   * @returns {Promise<Identity>}
   */
  async whoami() {
    /** @type {Identity} */
    const who = await this.request("GET", "/verifyApiKey");
    this.account = who.accountId;
    return who;
  }

  /**
   * @param {string} method
   * @param {string} path from the server root, or relative to the account when not starting with /
   * @param {unknown} [body]
   * @returns {Promise<any>}
   */
  async request(method, path, body) {
    const url = path.startsWith("/") ? path : `/v1/accounts/${this.account}/${path}`;
    /** @type {Record<string, string>} */
    const headers = { Authorization: `Bearer ${this.key}` };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(url, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await response.text();
    /** @type {any} */
    let data = {};
    try {
      data = text ? JSON.parse(text) : {};
    } catch {
      data = { message: text };
    }
    if (!response.ok) {
      const message = data?.message ?? data?.error?.message ?? `HTTP ${response.status}`;
      throw new ApiError(response.status, message, data?.code ?? data?.error?.type);
    }
    return data;
  }

  /**
   * Every item of a collection, following page tokens.
   * @param {string} collection e.g. "models"
   * @param {Record<string, string>} [params]
   * @returns {Promise<Resource[]>}
   */
  async listAll(collection, params = {}) {
    const key = collection.split("/").pop() ?? collection;
    /** @type {Resource[]} */
    const items = [];
    let token = "";
    do {
      const query = new URLSearchParams({ ...params, pageSize: "200", ...(token ? { pageToken: token } : {}) });
      const page = await this.request("GET", `${collection}?${query}`);
      items.push(...(page[key] ?? []));
      token = page.nextPageToken ?? "";
    } while (token);
    return items;
  }
}

/**
 * The last segment of a resource name: `accounts/a/models/m` → `m`.
 * @param {string | undefined} name
 */
export function shortName(name) {
  return (name ?? "").split("/").pop() ?? "";
}
