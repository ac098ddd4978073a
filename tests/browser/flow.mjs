// A person using the legal chat in Debian's Chromium (playwright-core), through lovd
// behind a real Caddy. Only clicks, typing, reloads and following a link: this script
// makes no API call of its own. tests/browser/test_browser.py runs it once per step
// and checks what it reports.
//
//   node flow.mjs SPEC_JSON
//
// SPEC: {base, artifacts, profile, locale, mode, name, url?, question?, start_label?,
//        expect_question?, second_question?, new_chat_label?}
//   mode "start":   the landing page → click start → the chat → ask → answer → reload
//   mode "link":    open a session link (/c/{id}?token=…) → the chat → ask → answer → reload
//   mode "return":  open the site again (the session may be stopped: it wakes) → the
//                   earlier conversation is shown
//   mode "page":    open a URL (a refusal, the landing page) and check it; with click,
//                   press that button on it (a form) and report where it led
//   mode "survive": open the chat at url (with expect_question), poll an XHR once a
//                   second, write ready_file, wait for killed_file (the test kills or
//                   stops the container then), reload once, and wait for the chat with
//                   its history again; reports kill_to_chat_ms and every status seen
// In every mode lovd's own pages met on the way are checked with axe-core. Prints one JSON
// line with what it saw; screenshots go to ARTIFACTS/<name>-*.png.
import { chromium } from "playwright-core";
import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";

const spec = JSON.parse(process.argv[2]);
const { base, artifacts, profile, locale, mode, name } = spec;
const AXE = fs.readFileSync(createRequire(import.meta.url).resolve("axe-core/axe.min.js"), "utf8");
const CODING_AGENTS = ["build", "plan", "general", "explore"];
const result = { name, mode, locale, steps: [], axe: [], lovd_pages: [] };
const t0 = Date.now();
const step = (what, extra = {}) => result.steps.push({ what, ms: Date.now() - t0, ...extra });

const ctx = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  locale, // sets navigator.language and Accept-Language, as a person's browser would
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"],
  viewport: { width: 1280, height: 800 },
});
const page = ctx.pages()[0] || (await ctx.newPage());
const shot = (what, opts = {}) =>
  page.screenshot({ path: path.join(artifacts, `${name}-${what}.png`), ...opts });

// Every request the page makes to the site (method, path with ids normalised, status),
// so the gate's allowlist can be checked against what the UI really uses.
const origin = new URL(base).origin;
const statuses = [];
const requests = new Map();
const normalise = (p) => p
  .replace(/\/[a-z]{3}_[0-9A-Za-z]{20,}(?=\/|$)/g, "/{id}")
  .replace(/^\/server\/[A-Za-z0-9_-]+(?=\/session)/, "/server/{server}")
  .replace(/^\/L[A-Za-z0-9_-]*(?=\/session(\/|$)|$)/, "/{dir}");
page.on("response", async (r) => {
  const u = new URL(r.url());
  if (u.origin !== origin) return;
  const req = r.request();
  statuses.push([r.status(), u.pathname, req.resourceType(), Date.now() - t0]);
  const key = `${req.method()} ${normalise(u.pathname)}`;
  const seen = requests.get(key) || { route: key, statuses: [], type: req.resourceType() };
  if (!seen.statuses.includes(r.status())) seen.statuses.push(r.status());
  requests.set(key, seen);
  if (r.status() === 403 && (r.headers()["content-type"] || "").includes("problem+json")) {
    const body = await r.text().catch(() => "");
    if (body.includes("opencode-route")) seen.gate_refused = body.slice(0, 300);
  }
});
// When the page went where (the landing's way: start → progress → redirect → chat).
result.navigations = [];
page.on("framenavigated", (f) => {
  if (f === page.mainFrame()) result.navigations.push([Date.now() - t0, new URL(f.url()).pathname.slice(0, 60)]);
});
page.on("websocket", (ws) => {
  const key = `WS ${normalise(new URL(ws.url()).pathname)}`;
  requests.set(key, { route: key, statuses: [], type: "websocket" });
});

async function until(what, fn, timeoutMs, every = 100) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    try { const v = await fn(); if (v) return v; } catch { /* the page is navigating */ }
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await page.waitForTimeout(every);
  }
}

const isLovdPage = () => page.evaluate(() =>
  !!document.querySelector('link[href="/_lovd/static/lovd.css"]'));

// lovd's own page as it is now: its language, heading, and axe-core's verdict.
async function checkLovdPage(what) {
  const info = await page.evaluate(() => ({
    lang: document.documentElement.lang,
    title: document.title,
    h1: document.querySelector("h1")?.textContent?.trim() || "",
    text: document.body.innerText.slice(0, 600),
  }));
  await page.evaluate(AXE);
  const axe = await page.evaluate(async () => {
    // The WCAG 2.1 A/AA rules and best practices; what a person meets is what counts.
    const r = await window.axe.run(document, { resultTypes: ["violations"] });
    return r.violations.map((v) => ({ id: v.id, impact: v.impact, help: v.help,
      nodes: v.nodes.slice(0, 3).map((n) => n.target.join(" ")) }));
  });
  result.lovd_pages.push({ what, ...info });
  result.axe.push({ what, violations: axe });
  await shot(what);
  step(`lovd page: ${what}`);
  return info;
}

const prompt = () => page.locator('[data-component="prompt-input"]').first();
const inChat = async () =>
  /\/session\/ses_/.test(new URL(page.url()).pathname) && (await prompt().isVisible());

// Wait for the chat; check lovd's pages (progress, waking) met on the way with axe once.
async function reachChat(timeoutMs) {
  let checked = false;
  return until("the chat with its prompt", async () => {
    if (!checked && (await isLovdPage().catch(() => false))) {
      const h1 = await page.locator("h1").first().textContent().catch(() => "");
      if (h1) { checked = true; result.met_progress = h1.trim(); await checkLovdPage("progress").catch(() => { checked = false; }); }
    }
    return inChat();
  }, timeoutMs);
}

// The agent the UI offers: its name on the agent button, and what the keyboard's
// "next agent" (Ctrl+.) and an "@" mention offer besides it.
async function agents() {
  const button = page.locator('button[aria-haspopup]').filter({ has: page.locator("span.capitalize") }).first();
  const shown = [];
  await prompt().click();
  for (let i = 0; i < 4; i++) {
    shown.push((await button.innerText()).trim().toLowerCase());
    await page.keyboard.press("Control+Period");
    await page.waitForTimeout(250);
  }
  await page.keyboard.type("@");
  await page.waitForTimeout(700);
  const popup = (await page.locator("body").innerText()).toLowerCase();
  const mentionable = CODING_AGENTS.filter((a) => new RegExp(`(^|\\n)\\s*${a}\\s*(\\n|$)`).test(popup));
  await shot("agent-mention");
  await page.keyboard.press("Escape");
  await page.keyboard.press("Backspace");
  result.agents_shown = [...new Set(shown)];
  result.agents_mentionable = mentionable;
  step("agents");
}

async function ask(question, key = "answer") {
  await prompt().click();
  await page.keyboard.type(question);
  await page.keyboard.press("Enter");
  step("asked");
  const t = Date.now();
  // The answer streams in over OpenCode's event stream, through Caddy.
  const link = page.getByText("lovdata.no/lov/", { exact: false }).first();
  await link.waitFor({ timeout: 90000 });
  result.first_link_ms = Date.now() - t;
  await until("the answer to finish", async () =>
    (await page.getByText(/juridisk rådgivning|legal advice/).count()) > 0, 30000, 250);
  await page.waitForTimeout(500);
  result[key] = (await page.locator("body").innerText()).slice(-2500);
  result[`${key}_links`] = await page.evaluate(() =>
    [...document.querySelectorAll('a[href^="https://lovdata.no/"]')].map((a) => a.href));
  step("answered");
  await shot(key);
}

async function conversationShown(question) {
  await reachChat(60000);
  await page.getByText(question, { exact: false }).first().waitFor({ timeout: 30000 });
  await page.getByText("lovdata.no/lov/", { exact: false }).first().waitFor({ timeout: 30000 });
  return true;
}

try {
  if (mode === "start") {
    await page.goto(base + "/");
    await page.getByRole("heading", { level: 1 }).waitFor();
    result.landing = await checkLovdPage("landing");
    const start = page.getByRole("button", { name: spec.start_label });
    step("landing");
    const clicked = Date.now();
    await start.click();
    await reachChat(120000);
    result.click_to_prompt_ms = Date.now() - clicked;
    step("chat", { click_to_prompt_ms: result.click_to_prompt_ms });
    result.chat_path = new URL(page.url()).pathname;
    await page.waitForTimeout(700);
    await shot("chat");
  } else if (mode === "link") {
    const opened = Date.now();
    await page.goto(spec.url);
    await reachChat(120000);
    result.link_to_prompt_ms = Date.now() - opened;
    result.chat_path = new URL(page.url()).pathname;
    step("chat");
    await page.waitForTimeout(700);
    await shot("chat");
  } else if (mode === "return") {
    const opened = Date.now();
    await page.goto(base + "/");
    await conversationShown(spec.expect_question);
    result.return_to_chat_ms = Date.now() - opened;
    result.chat_path = new URL(page.url()).pathname;
    result.conversation_shown = true;
    step("earlier conversation");
    await page.waitForTimeout(700);
    await shot("returned");
  } else if (mode === "survive") {
    // An XHR once a second in every document, as the chat UI's own polling does.
    await page.addInitScript(() => {
      setInterval(() => { fetch("/session", { headers: { accept: "application/json" } }).catch(() => {}); }, 1000);
    });
    await page.goto(spec.url);
    await conversationShown(spec.expect_question);
    step("chat before");
    await page.waitForTimeout(2000);
    fs.writeFileSync(spec.ready_file, "ready");
    await until("the container to be killed", async () => fs.existsSync(spec.killed_file), 60000, 50);
    const killed = Date.now();
    result.kill_at_ms = killed - t0;
    step("killed");
    await page.waitForTimeout(1000);
    // The person reloads the page; a hung container's page may take until its restart.
    await page.reload({ waitUntil: "commit", timeout: 90000 });
    await conversationShown(spec.expect_question);
    result.kill_to_chat_ms = Date.now() - killed;
    result.chat_path = new URL(page.url()).pathname;
    result.conversation_shown = true;
    step("chat again");
    await page.waitForTimeout(3000); // the polls go on: still no 502
    await shot("survived");
  } else if (mode === "page") {
    const r = await page.goto(spec.url);
    result.http_status = r ? r.status() : 0;
    await page.getByRole("heading", { level: 1 }).waitFor();
    result.page = await checkLovdPage("page");
    if (spec.click) {
      // A button on lovd's page (the "switch session?" form): where it leads.
      const [resp] = await Promise.all([
        page.waitForNavigation(),
        page.getByRole("button", { name: spec.click }).click(),
      ]);
      await page.waitForLoadState("load");
      result.after_click = { status: resp ? resp.status() : 0, path: new URL(page.url()).pathname };
      step(`clicked ${spec.click}`);
    }
  }
  if (mode !== "page") result.ui_text = (await page.locator("body").innerText()).slice(-400);

  if (mode === "start" || mode === "link") {
    // No project picker, no folder dialog: the chat is open in the session's workspace.
    result.picker_visible = await page.getByText(/Add project|Open project|Legg til prosjekt|Åpne prosjekt/).count();
    await agents();
    await ask(spec.question);
    const before = new URL(page.url()).pathname;
    await page.reload();
    result.reload_shown = await conversationShown(spec.question);
    result.reload_path = new URL(page.url()).pathname;
    result.reload_same_path = result.reload_path === before;
    step("reloaded");
    await page.waitForTimeout(700);
    await shot("reloaded");
  }
  if (spec.second_question) {
    // A new conversation, the way OpenCode offers it: its "new session" button, then
    // a question typed into the new chat's prompt.
    await page.locator(`button[aria-label="${spec.new_chat_label}"]`).first().click();
    await until("the new chat's prompt", async () => (await prompt().isVisible()) &&
      (await page.getByText(spec.question, { exact: false }).count()) === 0, 15000);
    step("new conversation");
    await ask(spec.second_question, "second_answer");
    result.second_path = new URL(page.url()).pathname;
    result.second_answered = result.second_answer.includes(spec.second_question);
  }
  result.ok = true;
} catch (e) {
  result.ok = false;
  result.error = String(e && e.message ? e.message : e).slice(0, 1000);
  result.url = page.url();
  await shot("failure").catch(() => {});
  fs.writeFileSync(path.join(artifacts, `${name}-failure.html`), await page.content().catch(() => ""));
} finally {
  result.requests = [...requests.values()].sort((a, b) => a.route.localeCompare(b.route));
  result.gate_refusals = result.requests.filter((r) => r.gate_refused);
  result.timeline = statuses.slice(0, 120).map(([s, p, , ms]) => `${ms} ${s} ${normalise(p)}`);
  // 503 is lovd's progress page at a navigation; any other 5xx is a failure.
  result.errors_5xx = statuses.filter(([s, , type]) => s >= 500 && !(s === 503 && type === "document"));
  result.statuses_502 = statuses.filter(([s]) => s === 502).length;
  result.statuses_503 = statuses.filter(([s]) => s === 503).length;
  await ctx.close();
}
console.log(JSON.stringify(result));
process.exit(result.ok ? 0 : 1);
