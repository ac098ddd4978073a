// The full browser flow against lovd behind Caddy, in Debian's Chromium via playwright-core:
// landing page → "Start a new session" → progress page → OpenCode UI (screenshot)
// → type a legal question → the stub LLM's reply (with a lovdata.no citation) appears.
//
//   node flow.mjs BASE_URL ARTIFACT_DIR
//
// Prints one JSON line with what it saw; exits non-zero on failure (with a screenshot).
import { chromium } from "playwright-core";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

const [base, artifacts] = process.argv.slice(2);
const QUESTION = "Hva sier arbeidsmiljøloven om oppsigelse?";
const result = { steps: [] };
const t0 = Date.now();
const step = (name, extra = {}) => result.steps.push({ name, ms: Date.now() - t0, ...extra });

const profile = fs.mkdtempSync(path.join(os.tmpdir(), "lovd-chromium-"));
const ctx = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"],
  viewport: { width: 1280, height: 800 },
});
const page = ctx.pages()[0] || (await ctx.newPage());
const statuses = [];
// Every request the page makes to the site (method, path with ids normalised, status),
// so the gate's allowlist can be checked against what the UI really uses.
const origin = new URL(base).origin;
const requests = new Map();
const normalise = (p) => p
  .replace(/\/[a-z]{3}_[0-9A-Za-z]{20,}(?=\/|$)/g, "/{id}")
  .replace(/^\/L[A-Za-z0-9_-]*(?=\/session(\/|$)|$)/, "/{dir}");
page.on("response", async (r) => {
  const u = new URL(r.url());
  statuses.push([r.status(), u.pathname]);
  if (u.origin !== origin) return;
  const req = r.request();
  const key = `${req.method()} ${normalise(u.pathname)}`;
  const seen = requests.get(key) || { route: key, statuses: [], type: req.resourceType() };
  if (!seen.statuses.includes(r.status())) seen.statuses.push(r.status());
  requests.set(key, seen);
  if (r.status() === 403 && (r.headers()["content-type"] || "").includes("problem+json")) {
    const body = await r.text().catch(() => "");
    if (body.includes("opencode-route")) seen.gate_refused = body.slice(0, 300);
  }
});
page.on("websocket", (ws) => {
  const key = `WS ${normalise(new URL(ws.url()).pathname)}`;
  requests.set(key, { route: key, statuses: [], type: "websocket" });
});

async function until(what, fn, timeoutMs) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    try { if (await fn()) return; } catch { /* page is navigating */ }
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await page.waitForTimeout(250);
  }
}

try {
  // 1. Landing page.
  await page.goto(base + "/");
  await page.getByRole("heading", { level: 1 }).waitFor();
  result.landing_title = await page.title();
  await page.screenshot({ path: path.join(artifacts, "1-landing.png") });
  step("landing");

  // 2. Start a session; the progress page continues on its own.
  await page.getByRole("button", { name: "Start a new session" }).click();
  step("clicked-start");
  await until("the OpenCode UI", async () =>
    (await page.locator("#progress-status").count()) === 0 && (await page.title()) === "OpenCode",
    120000);
  result.saw_progress_page = statuses.some(([s, p]) => s === 503 && p === "/");
  step("opencode-ui");
  const cookies = await ctx.cookies();
  const c = cookies.find((x) => x.name.endsWith("lovd_session"));
  result.cookie = c && { name: c.name, httpOnly: c.httpOnly, sameSite: c.sameSite, secure: c.secure };
  result.cookie_visible_to_js = await page.evaluate(() => document.cookie.includes("lovd_session"));
  await page.waitForTimeout(1500);
  await page.screenshot({ path: path.join(artifacts, "2-opencode-ui.png") });

  // 3. A chat session in the session's working directory. OpenCode's web UI asks for a
  //    project folder before the first prompt; the API call does that step (through
  //    the same proxy, with the same cookie), the question is typed in the UI.
  const where = await (await page.request.get(base + "/path")).json();
  const created = await page.request.post(base + "/session", { data: { title: "Legal question" } });
  if (!created.ok()) throw new Error(`POST /session: ${created.status()}`);
  const oc = await created.json();
  const dir = Buffer.from(where.directory).toString("base64url");
  await page.goto(`${base}/${dir}/session/${oc.id}`);
  const prompt = page.locator('[data-component="prompt-input"]').first();
  await prompt.waitFor({ timeout: 30000 });
  await prompt.click();
  await page.keyboard.type(QUESTION);
  await page.locator('[data-action="prompt-submit"]').click();
  step("asked");

  // 4. The stub LLM's answer streams in over OpenCode's SSE, through Caddy.
  const answer = page.getByText("lovdata.no/", { exact: false }).first();
  await answer.waitFor({ timeout: 90000 });
  await page.waitForTimeout(1000);
  result.answer = (await answer.innerText()).slice(0, 500);
  step("answered");
  await page.screenshot({ path: path.join(artifacts, "3-answer.png"), fullPage: true });
  result.ok = true;
} catch (e) {
  result.ok = false;
  result.error = String(e && e.message ? e.message : e).slice(0, 1000);
  await page.screenshot({ path: path.join(artifacts, "failure.png") }).catch(() => {});
  fs.writeFileSync(path.join(artifacts, "failure.html"), await page.content().catch(() => ""));
} finally {
  result.requests = [...requests.values()].sort((a, b) => a.route.localeCompare(b.route));
  result.gate_refusals = result.requests.filter((r) => r.gate_refused);
  result.errors_5xx = statuses.filter(([s, p]) => s >= 500 && !(s === 503 && p === "/"));
  await ctx.close();
  fs.rmSync(profile, { recursive: true, force: true });
}
console.log(JSON.stringify(result));
process.exit(result.ok ? 0 : 1);
