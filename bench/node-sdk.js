#!/usr/bin/env node
// Latency of the digi.me Node.js SDK's authorization calls against the local
// sandbox (test/sandbox), for comparison with digime (bench/bench.py). Run by
// bench/run.sh when DM_NODE_SDK is set; see bench/README.md.
//
//   node bench/node-sdk.js [options]
//
// Options (environment variable in brackets):
//   --sdk DIR            built SDK checkout, kept outside this repo [DM_NODE_SDK]
//   --base-url URL       API base [DM_SDK_BASE_URL, else $DM_SANDBOX_URL/v1.7/]
//   --onboard-url URL    onboarding base [DM_SDK_ONBOARD_URL, else $DM_SANDBOX_URL/apps/saas/]
//   --ca-file FILE       the sandbox's CA [DM_CA_FILE]
//   --app-id ID          application id [DM_SDK_APP_ID, default bench-app]
//   --contract-id ID     contract id [DM_SDK_CONTRACT_ID, default bench-contract]
//   --key-file FILE      contract private key [DM_SDK_KEY_FILE]
//   --calls M            calls per phase [DM_NODE_CALLS, default 200]
//   --warmup W           untimed getAuthorizeUrl calls first [default 10, as bench.py]
//   --callback URL       redirect URI [default https://bench.example/cb, as bench.py]
//   --compare FILE       digime's results (bench.py with DM_BENCH_JSON=FILE): print side by side
//   --no-sandbox-stats   do not read the sandbox's request log afterwards
//
// It only require()s the SDK; none of the SDK's code is in this repository.
// All traffic goes to the sandbox on a loopback address (refused otherwise),
// never through a proxy. Secrets (tokens, codes, verifier, key) are never printed.
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const https = require("node:https");
const { spawnSync } = require("node:child_process");

const PROXY_VARS = ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
                    "npm_config_proxy", "npm_config_https_proxy", "GLOBAL_AGENT_HTTP_PROXY",
                    "GLOBAL_AGENT_HTTPS_PROXY", "NODE_USE_ENV_PROXY"];

function die(msg, code = 1) {
    process.stderr.write("node-sdk.js: " + msg + "\n");
    process.exit(code);
}

// ---------------------------------------------------------------- options
function parseArgs(argv) {
    const env = process.env;
    const sb = env.DM_SANDBOX_URL ? env.DM_SANDBOX_URL.replace(/\/+$/, "") : null;
    const o = {
        sdk: env.DM_NODE_SDK || null,
        baseUrl: env.DM_SDK_BASE_URL || (sb && sb + "/v1.7/"),
        onboardUrl: env.DM_SDK_ONBOARD_URL || (sb && sb + "/apps/saas/"),
        caFile: env.DM_CA_FILE || null,
        appId: env.DM_SDK_APP_ID || "bench-app",
        contractId: env.DM_SDK_CONTRACT_ID || "bench-contract",
        keyFile: env.DM_SDK_KEY_FILE || null,
        calls: Number(env.DM_NODE_CALLS || 200),
        warmup: 10,
        callback: "https://bench.example/cb",
        compare: null,
        sandboxStats: true,
    };
    const names = {
        "--sdk": "sdk", "--base-url": "baseUrl", "--onboard-url": "onboardUrl", "--ca-file": "caFile",
        "--app-id": "appId", "--contract-id": "contractId", "--key-file": "keyFile", "--calls": "calls",
        "--warmup": "warmup", "--callback": "callback", "--compare": "compare",
    };
    for (let i = 0; i < argv.length; i++) {
        const a = argv[i];
        if (a === "--no-sandbox-stats") { o.sandboxStats = false; continue; }
        if (a === "-h" || a === "--help") {
            const src = fs.readFileSync(__filename, "utf8").split("\n");
            process.stdout.write(src.slice(1, src.findIndex((l) => l.startsWith('"use strict"')))
                .map((l) => l.replace(/^\/\/ ?/, "")).join("\n") + "\n");
            process.exit(0);
        }
        const eq = a.indexOf("=");
        const name = eq > 0 ? a.slice(0, eq) : a;
        if (!(name in names)) die("unknown option " + a + " (--help)", 2);
        const v = eq > 0 ? a.slice(eq + 1) : argv[++i];
        if (v === undefined) die(name + " needs a value", 2);
        o[names[name]] = v;
    }
    o.calls = Number(o.calls);
    o.warmup = Number(o.warmup);
    if (!Number.isInteger(o.calls) || o.calls < 1) die("--calls must be a positive integer", 2);
    if (!Number.isInteger(o.warmup) || o.warmup < 0) die("--warmup must be an integer >= 0", 2);
    for (const [k, flag] of [["sdk", "--sdk / DM_NODE_SDK"], ["baseUrl", "--base-url / DM_SDK_BASE_URL / DM_SANDBOX_URL"],
                             ["onboardUrl", "--onboard-url / DM_SDK_ONBOARD_URL / DM_SANDBOX_URL"],
                             ["caFile", "--ca-file / DM_CA_FILE"], ["keyFile", "--key-file / DM_SDK_KEY_FILE"]]) {
        if (!o[k]) die("missing " + flag, 2);
    }
    o.sdk = path.resolve(o.sdk);
    o.caFile = path.resolve(o.caFile);
    o.keyFile = path.resolve(o.keyFile);
    return o;
}

function isLoopback(u) {
    const h = new URL(u).hostname.replace(/^\[|\]$/g, "");
    return h === "localhost" || h === "::1" || /^127\.\d+\.\d+\.\d+$/.test(h);
}

// ---------------------------------------------------------------- environment
// NODE_EXTRA_CA_CERTS is read only when node starts, so set it (and drop any
// proxy setting) by running this script again in a child with that environment.
function ensureEnvironment(o) {
    const proxies = PROXY_VARS.filter((v) => process.env[v] !== undefined);
    if (process.env.NODE_EXTRA_CA_CERTS === o.caFile && proxies.length === 0) return;
    if (process.env.DM_NODE_SDK_REEXEC) die("could not set NODE_EXTRA_CA_CERTS / clear proxy variables");
    const env = { ...process.env, NODE_EXTRA_CA_CERTS: o.caFile, DM_NODE_SDK_REEXEC: "1",
                  NO_PROXY: "127.0.0.1,localhost,::1", no_proxy: "127.0.0.1,localhost,::1" };
    for (const v of PROXY_VARS) delete env[v];
    const r = spawnSync(process.execPath, [__filename, ...process.argv.slice(2)], { env, stdio: "inherit" });
    if (r.error) die("could not re-run node: " + r.error.message);
    process.exit(r.status === null ? 1 : r.status);
}

// ---------------------------------------------------------------- helpers
const nowMs = () => Number(process.hrtime.bigint()) / 1e6;

function median(xs) {
    const s = [...xs].sort((a, b) => a - b);
    const m = s.length >> 1;
    return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

// Same definition as bench/bench.py: sorted(ms)[int(len(ms) * 0.9) - 1].
function p90(xs) {
    const s = [...xs].sort((a, b) => a - b);
    return s.at(Math.floor(s.length * 0.9) - 1);
}

function stats(xs) {
    return { calls: xs.length, median_ms: round(median(xs)), p90_ms: round(p90(xs)),
             min_ms: round(Math.min(...xs)), max_ms: round(Math.max(...xs)) };
}

const round = (x) => Math.round(x * 100) / 100;

// A failing SDK call, described without secrets (the SDK's errors carry
// digi.me's code, message and reference, never the request).
function describe(err) {
    if (!err) return String(err);
    const parts = [err.name || "Error"];
    if (err.code) parts.push("code " + err.code);
    if (err.statusCode || (err.response && err.response.statusCode))
        parts.push("HTTP " + (err.statusCode || err.response.statusCode));
    parts.push(String(err.message || "").slice(0, 300));
    return parts.join(": ");
}

function withTimeout(promise, ms, what) {
    let timer;
    return Promise.race([
        promise,
        new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(what + " timed out")), ms); }),
    ]).finally(() => clearTimeout(timer));
}

// GET like a browser at the consent page: no redirect following; returns the Location.
function followOnboarding(url) {
    return new Promise((resolve, reject) => {
        const req = https.get(url, { agent: false }, (res) => {
            res.resume();
            res.on("end", () => {
                if (res.statusCode !== 302 || !res.headers.location)
                    reject(new Error("onboarding page answered HTTP " + res.statusCode + " without a redirect"));
                else resolve(res.headers.location);
            });
        });
        req.on("error", reject);
        req.setTimeout(30000, () => req.destroy(new Error("onboarding page timed out")));
    });
}

// The sandbox's control API (same origin as the API base); JSON.
function sandboxGet(o, p) {
    return new Promise((resolve, reject) => {
        const u = new URL("/_sandbox/" + p, o.baseUrl);
        https.get(u, { agent: false }, (res) => {
            const chunks = [];
            res.on("data", (c) => chunks.push(c));
            res.on("end", () => {
                if (res.statusCode !== 200) return reject(new Error("sandbox " + p + ": HTTP " + res.statusCode));
                try { resolve(JSON.parse(Buffer.concat(chunks).toString("utf8"))); } catch (e) { reject(e); }
            });
        }).on("error", reject);
    });
}

// What the sandbox saw in one phase: requests per endpoint, TCP connections.
function summarize(records) {
    const byEndpoint = {};
    const connections = new Set();
    let failed = 0;
    for (const r of records) {
        const k = r.endpoint || r.path;
        byEndpoint[k] = (byEndpoint[k] || 0) + 1;
        if (r.connection != null) connections.add(r.connection);
        if (r.status === null || r.status >= 400) failed++;
    }
    return { requests: records.length, by_endpoint: byEndpoint, tcp_connections: connections.size, failed };
}

// ---------------------------------------------------------------- main
async function main() {
    const o = parseArgs(process.argv.slice(2));
    for (const u of [o.baseUrl, o.onboardUrl]) {
        if (!isLoopback(u)) die("refusing a non-loopback URL: " + u + " (this benchmark talks to the local sandbox only)", 2);
    }
    ensureEnvironment(o);

    let pkg;
    try {
        pkg = JSON.parse(fs.readFileSync(path.join(o.sdk, "package.json"), "utf8"));
    } catch (e) {
        die(o.sdk + " is not an SDK checkout (no readable package.json)", 2);
    }
    const main = path.join(o.sdk, pkg.main || "dist/main/index.js");
    if (!fs.existsSync(main)) die(o.sdk + " is not built (" + main + " missing): run `npm ci && npm run build` there", 2);
    const sdkLib = require(main);
    if (typeof sdkLib.init !== "function") die(main + " does not export init()", 2);

    const sdk = sdkLib.init({ applicationId: o.appId, baseUrl: o.baseUrl, onboardUrl: o.onboardUrl });
    const contractDetails = { contractId: o.contractId, privateKey: fs.readFileSync(o.keyFile, "utf8") };
    const T = 30000;

    let seq = 0;
    const phaseStats = {};
    async function markPhase(name) {
        if (!o.sandboxStats) return;
        const recs = await sandboxGet(o, "requests?since=" + seq);
        if (name) phaseStats[name] = summarize(recs);
        if (recs.length) seq = recs[recs.length - 1].seq;
    }
    try {
        await markPhase(null);
    } catch (e) {
        process.stderr.write("node-sdk.js: sandbox request log not readable (" + e.message + "); no per-phase request counts\n");
        o.sandboxStats = false;
    }

    const authorize = (state) => withTimeout(sdk.getAuthorizeUrl({ contractDetails, callback: o.callback, state }),
                                             T, "getAuthorizeUrl");

    // 1. getAuthorizeUrl: warm-up, then M timed calls.
    for (let i = 0; i < o.warmup; i++) await authorize("node-warmup-" + i);
    await markPhase(null);
    const authMs = [];
    for (let i = 0; i < o.calls; i++) {
        const t = nowMs();
        await authorize("node-a" + i);
        authMs.push(nowMs() - t);
    }
    await markPhase("authorize");

    // 2. One full flow: authorize, the consent page (302 to the callback), code exchange.
    const state = "node-flow";
    const t0 = nowMs();
    const { url, codeVerifier } = await authorize(state);
    const t1 = nowMs();
    const location = new URL(await followOnboarding(url));
    const t2 = nowMs();
    const q = location.searchParams;
    if (q.get("success") !== "true") die("the onboarding page reported success=" + q.get("success") + " errorCode=" + q.get("errorCode"));
    if (q.get("state") !== state) die("the callback's state does not match");
    if (!q.get("code")) die("the callback has no code");
    let token = await withTimeout(sdk.exchangeCodeForToken({ contractDetails, codeVerifier, authorizationCode: q.get("code") }),
                                  T, "exchangeCodeForToken");
    const t3 = nowMs();
    if (!token.accessToken.value || !token.refreshToken.value) die("exchangeCodeForToken returned no token pair");
    const flow = { total_ms: round(t3 - t0), authorize_ms: round(t1 - t0), onboarding_ms: round(t2 - t1),
                   exchange_ms: round(t3 - t2) };
    await markPhase("flow");

    // 3. refreshToken M times in sequence, each with the pair the previous one returned.
    const refreshMs = [];
    for (let i = 0; i < o.calls; i++) {
        const t = nowMs();
        const next = await withTimeout(sdk.refreshToken({ contractDetails, userAccessToken: token }), T, "refreshToken");
        refreshMs.push(nowMs() - t);
        if (!next.refreshToken.value || next.refreshToken.value === token.refreshToken.value)
            die("refresh " + (i + 1) + " did not return a new refresh token");
        token = next;
    }
    await markPhase("refresh");

    // ------------------------------------------------------------ report
    const res = {
        tool: "digime-sdk-nodejs",
        sdk_version: pkg.version,
        node: process.version,
        calls: o.calls,
        warmup: o.warmup,
        authorize: stats(authMs),
        refresh: stats(refreshMs),
        flow,
        jwks_cache: false,
        sandbox_requests: o.sandboxStats ? phaseStats : null,
    };

    const line = (name, s) => console.log("%s %s %s %s", name.padEnd(22), String(s.calls).padStart(6),
                                          s.median_ms.toFixed(2).padStart(10), s.p90_ms.toFixed(2).padStart(10));
    console.log("Node.js SDK %s (node %s) against %s", pkg.version, process.version, o.baseUrl);
    console.log("%s %s %s %s", "call".padEnd(22), "calls".padStart(6), "median ms".padStart(10), "p90 ms".padStart(10));
    line("getAuthorizeUrl", res.authorize);
    line("refreshToken", res.refresh);
    console.log("full flow once: %s ms (getAuthorizeUrl %s + onboarding page %s + exchangeCodeForToken %s)",
                flow.total_ms.toFixed(2), flow.authorize_ms.toFixed(2), flow.onboarding_ms.toFixed(2), flow.exchange_ms.toFixed(2));
    console.log("note: the SDK has no JWKS cache; it GETs the JWKS (the answer's jku) for every answer it verifies, " +
                "so each getAuthorizeUrl, exchangeCodeForToken and refreshToken costs two HTTP requests. " +
                "That is its normal behaviour and part of the figures above.");
    if (o.sandboxStats) {
        for (const [name, s] of Object.entries(phaseStats)) {
            console.log("sandbox saw during %s: %d requests (%s) over %d TCP connection(s)%s", name, s.requests,
                        Object.entries(s.by_endpoint).map(([k, v]) => k + " " + v).join(", "), s.tcp_connections,
                        s.failed ? ", " + s.failed + " failed" : "");
        }
    }
    if (o.compare) printComparison(o.compare, res);
    console.log(JSON.stringify(res));
}

// digime's figures (bench.py's DM_BENCH_JSON) next to the SDK's.
function printComparison(file, res) {
    let dm;
    try {
        dm = JSON.parse(fs.readFileSync(file, "utf8"));
    } catch (e) {
        process.stderr.write("node-sdk.js: no digime results to compare (" + e.message + ")\n");
        return;
    }
    const by = Object.fromEntries((dm.results || []).map((r) => [r.scenario, r]));
    const row = (name, s, ref) => console.log("%s %s %s %s %s", name.padEnd(44), String(s.calls).padStart(6),
        s.median_ms.toFixed(2).padStart(10), s.p90_ms.toFixed(2).padStart(10),
        (s.median_ms / (ref || s).median_ms).toFixed(2).padStart(8));
    console.log("");
    console.log("comparison (same sandbox, same machine, one after the other; x digime = median / digime's warm median)");
    console.log("%s %s %s %s %s", "".padEnd(44), "calls".padStart(6), "median ms".padStart(10), "p90 ms".padStart(10),
                "x digime".padStart(8));
    if (by.refresh) {
        row("refresh: digime_refresh_token (warm)", by.refresh);
        row("refresh: SDK refreshToken", res.refresh, by.refresh);
    }
    if (by.warm) {
        row("authorize: digime_authorize_url (warm)", by.warm);
        if (by["no-cache"]) row("authorize: digime, jwks_cache_ttl = 0", by["no-cache"], by.warm);
        row("authorize: SDK getAuthorizeUrl", res.authorize, by.warm);
    }
}

main().catch((err) => die(describe(err)));
