// Drives a running JupyterLab in headless Chromium (Debian's, through playwright-core; nothing
// is downloaded): opens a notebook, runs all its cells from the Run menu, waits until the page
// shows the run finished (or a deadline passes), saves a screenshot and prints ONE line of JSON
// with what the page showed. The pytest side (test_jupyterlab.py) makes the assertions.
//
//   node run_notebook.mjs '{"url": "http://127.0.0.1:PORT/lab/workspaces/W/tree/nb.ipynb?token=T&reset",
//                          "screenshot": "/tmp/x.png", "marker": "NEXT-CELL-RAN 42",
//                          "cells": 6, "timeout_s": 60, "chromium": "/usr/bin/chromium"}'
//
// Exit status: 0 when the JSON line was printed (whatever the page showed), 2 for a usage or
// browser-start error (the message is on stderr).

import fs from "node:fs";
import os from "node:os";
import path from "node:path";

import { chromium } from "playwright-core";

const opts = JSON.parse(process.argv[2] ?? "{}");
for (const key of ["url", "screenshot", "marker"]) {
  if (!opts[key]) {
    console.error(`run_notebook.mjs: missing "${key}" in the JSON argument`);
    process.exit(2);
  }
}
const deadline = Date.now() + 1000 * (opts.timeout_s ?? 60);
const executablePath = opts.chromium ?? "/usr/bin/chromium";
const left = () => Math.max(1000, deadline - Date.now());
const t0 = Date.now();
const timings = {};
const mark = (name) => {
  timings[name] = (Date.now() - t0) / 1000;
};

// Everything the test needs to know, read from the DOM in one go.
function readPage(marker) {
  // A bar is full by its aria values, by the inner bar's width, or by an "N / N" next to it.
  const full = (p) => {
    if (p.aria_now !== null && p.aria_max !== null && p.aria_now === p.aria_max) return true;
    if (p.width && parseFloat(p.width) >= 100) return true;
    const m = p.row_text.match(/(\d+)\s*\/\s*(\d+)/);
    return Boolean(m && m[1] === m[2] && Number(m[2]) > 0);
  };
  const text = (el) => (el ? el.textContent.replace(/\s+/g, " ").trim() : "");
  const cells = [...document.querySelectorAll(".jp-Notebook .jp-Cell")];
  const codeCells = cells.filter((c) => c.classList.contains("jp-CodeCell"));
  const prompts = codeCells.map((c) => text(c.querySelector(".jp-InputPrompt")));
  const outputs = [...document.querySelectorAll(".jp-Notebook .jp-OutputArea-output")];
  const batchCell = codeCells.findIndex((c) => c.querySelector(".widget-hprogress") !== null);
  const markerCell = codeCells.findIndex((c) =>
    [...c.querySelectorAll(".jp-OutputArea-output")].some((o) => text(o).includes(marker)),
  );
  const progress = [...document.querySelectorAll(".widget-hprogress")].map((w) => {
    const bar = w.querySelector(".progress-bar");
    const aria = w.querySelector("[aria-valuenow]") ?? (w.hasAttribute("aria-valuenow") ? w : null);
    // The "N / N" text next to a bar, when there is one (a Label in the same box, or the
    // widget's own readout).
    const row = w.parentElement;
    return {
      width: bar ? bar.style.width : null,
      computed_ratio:
        bar && bar.parentElement && bar.parentElement.getBoundingClientRect().width > 0
          ? bar.getBoundingClientRect().width / bar.parentElement.getBoundingClientRect().width
          : null,
      aria_now: aria ? aria.getAttribute("aria-valuenow") : null,
      aria_max: aria ? aria.getAttribute("aria-valuemax") : null,
      label: text(w.querySelector(".widget-label")),
      row_text: text(row),
    };
  });
  progress.forEach((p) => {
    p.done = full(p);
  });
  const busy = prompts.filter((p) => p.includes("[*]")).length;
  const kernelItem = [...document.querySelectorAll(".jp-StatusBar-TextItem")]
    .map(text)
    .find((t) => / \| \w+$/.test(t));
  return {
    cells: cells.length,
    prompts,
    busy_cells: busy,
    // The run is over: the marker is printed, nothing is queued or running, a bar is full.
    finished: markerCell >= 0 && busy === 0 && progress.some((p) => p.done),
    marker_found: markerCell >= 0,
    marker_cell: markerCell,
    batch_cell: batchCell,
    progress,
    loading_widget: document.body.innerText.includes("Loading widget..."),
    errors: outputs
      .filter((o) => o.getAttribute("data-mime-type") === "application/vnd.jupyter.error")
      .map((o) => text(o).slice(0, 2000)),
    kernel: kernelItem ?? null,
    dialogs: [...document.querySelectorAll(".jp-Dialog")].map((d) => text(d).slice(0, 300)),
  };
}


const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "nbllm-chromium-"));
let context;
const result = { ok: false, timings, external_requests: [], console_errors: [] };
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: true,
    viewport: { width: 1400, height: 1200 },
    timeout: 30000,
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
page.on("request", (req) => {
  const u = req.url();
  if (!u.startsWith(origin) && !u.startsWith("data:") && !u.startsWith("blob:")) {
    result.external_requests.push(u);
  }
});
page.on("console", (msg) => {
  if (msg.type() === "error") result.console_errors.push(msg.text().slice(0, 500));
});

try {
  await page.goto(opts.url, { timeout: left(), waitUntil: "domcontentloaded" });
  // The notebook is open once all its cells are in the DOM and the kernel says Idle.
  const wantCells = opts.cells ?? 1;
  await page.waitForFunction(
    (n) => document.querySelectorAll(".jp-Notebook .jp-Cell").length >= n,
    wantCells,
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

  // Run > Run All Cells, as a user would.
  await page.locator(".jp-Notebook").first().click({ position: { x: 5, y: 5 }, timeout: left() });
  mark("focused");
  await page.locator(".lm-MenuBar-item", { hasText: /^Run$/ }).click({ timeout: left() });
  mark("menu_open");
  await page.locator(".lm-Menu-itemLabel", { hasText: /^Run All Cells$/ }).click({ timeout: left() });
  mark("run_all_clicked");

  // Wait for the run to be over (see readPage's "finished").
  for (;;) {
    const state = await page.evaluate(readPage, opts.marker);
    if (state.finished) break;
    if (Date.now() >= deadline) {
      throw new Error(`the run did not finish within ${opts.timeout_s ?? 60} s`);
    }
    await page.waitForTimeout(250);
  }
  mark("run_finished");
  result.ok = true;
} catch (err) {
  result.error = err.message.split("\n")[0];
}

try {
  // For the picture: the batch cell's outputs at the top, the cells after it below.
  await page.evaluate(() => {
    const cell = document.querySelector(".widget-hprogress")?.closest(".jp-Cell");
    cell?.querySelector(".jp-Cell-outputWrapper")?.scrollIntoView({ block: "start" });
  });
  await page.waitForTimeout(300);
  result.page = await page.evaluate(readPage, opts.marker);
  result.page.progress_done = result.page.progress.map((p) => p.done);
  await page.screenshot({ path: opts.screenshot, timeout: 15000 });
  result.screenshot = opts.screenshot;
} catch (err) {
  result.error = result.error ?? `reading the page: ${err.message.split("\n")[0]}`;
}
mark("total");
await context.close().catch(() => {});
fs.rmSync(userDataDir, { recursive: true, force: true });
console.log(JSON.stringify(result));
