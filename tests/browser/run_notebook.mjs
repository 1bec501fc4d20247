// Drives a running JupyterLab in headless Chromium (Debian's, through playwright-core; nothing
// is downloaded): opens a notebook, runs all its cells from the Run menu, watches the first
// %%llm_batch cell while it runs (one picture of it mid-run), waits until no cell is queued or
// running (or a deadline passes), saves the notebook with JupyterLab's own Save, takes the
// pictures of the end and prints ONE line of JSON with what the page showed, cell by cell.
// The pytest side (test_jupyterlab.py) makes the assertions.
//
//   node run_notebook.mjs '{"url": "http://127.0.0.1:PORT/lab/workspaces/W/tree/nb.ipynb?token=T&reset",
//                          "screenshot": "/tmp/page.png", "midrun_screenshot": "/tmp/mid.png",
//                          "narrow_screenshot": "/tmp/narrow.png",
//                          "end_screenshots": [["%%llm_batch", "/tmp/end.png"]],
//                          "cells": 14, "timeout_s": 120, "chromium": "/usr/bin/chromium"}'
//
// "end_screenshots": [source prefix, file] pairs: a picture of the first code cell whose
// source starts with that prefix, once every cell ran. "narrow_screenshot": right after the
// mid-run picture the window is made 600 px wide for a moment; the batch cell's picture then,
// and whether any of its outputs is wider than the cell (cut off, or scrolled sideways).
// "background" (optional): the batch cell runs in the background (the cell itself ends at
// once); its mid-run picture is taken while any cell is still busy.
// "reopen_url" (optional): once saved, the notebook's kernel is shut down and the notebook
// opened again at that URL in a new window; "reopened" in the report is what it showed, and
// "reopened_screenshot" (optional) a picture of its batch cell.
//
// Exit status: 0 when the JSON line was printed (whatever the page showed), 2 for a usage or
// browser-start error (the message is on stderr).

import fs from "node:fs";
import os from "node:os";
import path from "node:path";

import { chromium } from "playwright-core";

const opts = JSON.parse(process.argv[2] ?? "{}");
for (const key of ["url", "screenshot", "midrun_screenshot", "narrow_screenshot"]) {
  if (!opts[key]) {
    console.error(`run_notebook.mjs: missing "${key}" in the JSON argument`);
    process.exit(2);
  }
}
const deadline = Date.now() + 1000 * (opts.timeout_s ?? 120);
const executablePath = opts.chromium ?? "/usr/bin/chromium";
const left = () => Math.max(1000, deadline - Date.now());
const t0 = Date.now();
const timings = {};
const mark = (name) => {
  timings[name] = (Date.now() - t0) / 1000;
};

// Everything the test needs to know, read from the DOM in one go: each code cell's source,
// prompt, outputs (kind, text, images) and progress bars.
function readPage() {
  const text = (el) => (el ? el.textContent.replace(/\s+/g, " ").trim() : "");
  // A bar's filled share: its aria values, else the inner bar's width.
  const ratio = (w) => {
    const aria = w.querySelector("[aria-valuenow]") ?? (w.hasAttribute("aria-valuenow") ? w : null);
    if (aria) {
      const now = Number(aria.getAttribute("aria-valuenow"));
      const max = Number(aria.getAttribute("aria-valuemax"));
      if (max > 0) return now / max;
    }
    const bar = w.querySelector(".progress-bar");
    if (bar && bar.style.width) return parseFloat(bar.style.width) / 100;
    return null;
  };
  const cells = [...document.querySelectorAll(".jp-Notebook .jp-Cell")];
  const codeCells = cells
    .map((c, index) => ({ c, index }))
    .filter(({ c }) => c.classList.contains("jp-CodeCell"))
    .map(({ c, index }) => ({
      index,
      source: [...c.querySelectorAll(".jp-InputArea .cm-line")].map((l) => l.textContent).join("\n"),
      prompt: text(c.querySelector(".jp-InputPrompt")),
      outputs: [...c.querySelectorAll(".jp-OutputArea-output")].map((o) => ({
        mime: o.getAttribute("data-mime-type"),
        // innerText: the words of different widgets stay apart, as a reader sees them.
        text: o.innerText.replace(/\s+/g, " ").trim().slice(0, 4000),
        images: o.querySelectorAll("img").length,
      })),
      bars: [...c.querySelectorAll(".widget-hprogress")].map(ratio),
    }));
  const busy = codeCells.filter((c) => c.prompt.includes("*")).length;
  const ran = codeCells.filter((c) => /\[\d+\]/.test(c.prompt)).length;
  return {
    cells: cells.length,
    code_cells: codeCells,
    busy_cells: busy,
    ran_cells: ran,
    loading_widget: document.body.innerText.includes("Loading widget..."),
    widget_errors: document.body.innerText.includes("Error displaying widget"),
    dirty: document.querySelector(".lm-TabBar-tab.jp-mod-current.jp-mod-dirty") !== null,
    dialogs: [...document.querySelectorAll(".jp-Dialog")].map((d) => text(d).slice(0, 300)),
  };
}

// The first code cell whose source starts with ``prefix`` (its DOM index among all cells),
// or -1; the batch cell is the first %%llm_batch cell.
const cellIndex = (state, prefix) =>
  state.code_cells.find((c) => c.source.startsWith(prefix))?.index ?? -1;
const batchCellIndex = (state) => cellIndex(state, "%%llm_batch");

// How far each output of cell ``index`` reaches past the cell's own width (0: it fits).
function overflow(index) {
  const cell = document.querySelectorAll(".jp-Notebook .jp-Cell")[index];
  return [...cell.querySelectorAll(".jp-OutputArea-output")].map((o) =>
    Math.max(0, o.scrollWidth - o.clientWidth),
  );
}

// Two animation frames: whatever changed is laid out and painted.
const painted = (p) =>
  p.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));

async function cellShot(index, file, p = page) {
  const cell = p.locator(".jp-Notebook .jp-Cell").nth(index);
  await cell.scrollIntoViewIfNeeded({ timeout: 5000 });
  await painted(p);
  await cell.screenshot({ path: file, timeout: 10000, animations: "disabled" });
}

// Every request that leaves 127.0.0.1 is noted; console errors too.
function watch(p) {
  p.on("request", (req) => {
    const u = req.url();
    if (!u.startsWith(origin) && !u.startsWith("data:") && !u.startsWith("blob:")) {
      result.external_requests.push(u);
    }
  });
  p.on("console", (msg) => {
    if (msg.type() === "error") result.console_errors.push(msg.text().slice(0, 500));
  });
}

// The saved notebook opened again later, in a new window, once the kernel that ran it is
// gone: what it shows without that kernel's widgets.
async function reopen() {
  const token = new URL(opts.url).searchParams.get("token");
  const api = (route) => `${origin}/api/${route}?token=${token}`;
  for (const session of await (await fetch(api("sessions"))).json()) {
    await fetch(api(`sessions/${session.id}`), { method: "DELETE" });
  }
  await page.close();
  const again = await context.newPage();
  watch(again);
  await again.goto(opts.reopen_url, { timeout: left(), waitUntil: "domcontentloaded" });
  await again.waitForFunction(
    (n) => document.querySelectorAll(".jp-Notebook .jp-Cell").length >= n,
    opts.cells ?? 1,
    { timeout: left(), polling: 250 },
  );
  // The widget manager has had its chance to draw (or fail to draw) every output.
  await again.waitForTimeout(2000);
  const state = await again.evaluate(readPage);
  const index = batchCellIndex(state);
  if (index >= 0 && opts.reopened_screenshot) {
    await cellShot(index, opts.reopened_screenshot, again);
  }
  return { ...state, screenshot: opts.reopened_screenshot };
}

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "nbllm-chromium-"));
let context;
const result = { ok: false, timings, external_requests: [], console_errors: [] };
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: true,
    viewport: { width: opts.width ?? 1100, height: opts.height ?? 1000 },
    timeout: Math.min(60000, left()),  // a busy machine can take half a minute to start it
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--disable-dev-shm-usage",
    ],
  });
} catch (err) {
  console.error(`run_notebook.mjs: could not start ${executablePath}: ${err.message}`);
  fs.rmSync(userDataDir, { recursive: true, force: true });
  process.exit(2);
}
mark("browser_started");

const page = context.pages()[0] ?? (await context.newPage());
const origin = new URL(opts.url).origin;
watch(page);

try {
  await page.goto(opts.url, { timeout: left(), waitUntil: "domcontentloaded" });
  // The notebook is open once all its cells are in the DOM and the kernel says Idle.
  await page.waitForFunction(
    (n) => document.querySelectorAll(".jp-Notebook .jp-Cell").length >= n,
    opts.cells ?? 1,
    { timeout: left(), polling: 250 },
  );
  mark("notebook_shown");
  await page.waitForFunction(
    () =>
      [...document.querySelectorAll(".jp-StatusBar-TextItem")].some((e) =>
        / \| Idle$/.test(e.textContent.trim()),
      ),
    null,
    { timeout: left(), polling: 250 },
  );
  mark("kernel_idle");
  // The file browser folded away: the cells get the width a reader's window gives them.
  await page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current").first()
    .click({ timeout: 5000 })
    .catch(() => {});

  // Run > Run All Cells, as a user would.
  await page.locator(".jp-Notebook").first().click({ position: { x: 5, y: 5 }, timeout: left() });
  await page.locator(".lm-MenuBar-item", { hasText: /^Run$/ }).click({ timeout: left() });
  await page.locator(".lm-Menu-itemLabel", { hasText: /^Run All Cells$/ }).click({ timeout: left() });
  mark("run_all_clicked");

  // Until no cell is queued or running, with one picture of the batch cell while it runs,
  // the first time its bar is at least a third full.
  let started = false;
  for (;;) {
    const state = await page.evaluate(readPage);
    started = started || state.busy_cells > 0 || state.ran_cells > 0;
    const index = batchCellIndex(state);
    const batch = state.code_cells.find((c) => c.index === index);
    const share = batch?.bars?.[0];
    if (batch && share !== undefined && !timings.batch_in_view) {
      // The batch cell in view from its start: the page paints it all along, so a picture
      // of it needs no scrolling, which could catch regions not painted since they changed.
      await page.evaluate((i) => {
        document.querySelectorAll(".jp-Notebook .jp-Cell")[i].scrollIntoView({ block: "start" });
      }, index);
      mark("batch_in_view");
    }
    // "background": the batch cell returns at once (--background, --batch-api); its run goes
    // on while a later cell waits for it.
    const running = batch?.prompt.includes("*") || (opts.background && state.busy_cells > 0);
    if (batch && running && share > 0 && share < 1) {
      timings.first_progress ??= (Date.now() - t0) / 1000;
      if (!result.midrun && share >= 1 / 3) {
        await cellShot(index, opts.midrun_screenshot);
        // What the cell showed right after the picture: the figures of a run in progress.
        const after = (await page.evaluate(readPage)).code_cells.find((c) => c.index === index);
        result.midrun = { share, cell: batch, after, screenshot: opts.midrun_screenshot };
        mark("midrun_screenshot");
        // The same run in a 600 px window: the figures wrap, nothing is cut off.
        const viewport = page.viewportSize();
        await page.setViewportSize({ width: 600, height: viewport.height });
        await page.waitForTimeout(300);
        await cellShot(index, opts.narrow_screenshot);
        const narrow = (await page.evaluate(readPage)).code_cells.find((c) => c.index === index);
        result.narrow = {
          overflow_px: await page.evaluate(overflow, index),
          cell: narrow,
          screenshot: opts.narrow_screenshot,
        };
        await page.setViewportSize(viewport);
        mark("narrow_screenshot");
      }
    }
    if (started && state.busy_cells === 0) break;
    if (Date.now() >= deadline) {
      throw new Error(`the cells did not finish within ${opts.timeout_s ?? 120} s`);
    }
    await page.waitForTimeout(200);
  }
  mark("cells_finished");
  // The last redraws land (the dashboard redraws at least once a second while it changes).
  await page.waitForTimeout(1200);

  // File > Save, by its shortcut; saved once the tab loses its dirty mark.
  await page.locator(".jp-Notebook").first().click({ position: { x: 5, y: 5 }, timeout: left() });
  await page.keyboard.press("Control+s");
  await page.waitForFunction(
    () => document.querySelector(".lm-TabBar-tab.jp-mod-current.jp-mod-dirty") === null,
    null,
    { timeout: Math.min(left(), 15000), polling: 200 },
  );
  mark("saved");
  result.ok = true;
} catch (err) {
  result.error = err.message.split("\n")[0];
}

try {
  result.page = await page.evaluate(readPage);
  result.end_screenshots = [];
  for (const [prefix, file] of opts.end_screenshots ?? []) {
    const index = cellIndex(result.page, prefix);
    if (index >= 0) {
      await cellShot(index, file);
      result.end_screenshots.push(file);
    }
  }
  // For the picture of the page: the batch cell at the top.
  await page.evaluate((i) => {
    document.querySelectorAll(".jp-Notebook .jp-Cell")[i]?.scrollIntoView({ block: "start" });
  }, batchCellIndex(result.page));
  await page.waitForTimeout(300);
  await page.screenshot({ path: opts.screenshot, timeout: 15000 });
  result.screenshot = opts.screenshot;
} catch (err) {
  result.error = result.error ?? `reading the page: ${err.message.split("\n")[0]}`;
}
if (result.ok && opts.reopen_url) {
  try {
    result.reopened = await reopen();
    mark("reopened");
  } catch (err) {
    result.error = `reopening the notebook: ${err.message.split("\n")[0]}`;
  }
}
mark("total");
await context.close().catch(() => {});
fs.rmSync(userDataDir, { recursive: true, force: true });
console.log(JSON.stringify(result));
