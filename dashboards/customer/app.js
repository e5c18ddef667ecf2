// Tally customer cost dashboard. Every figure is read from the /v1 API with
// the customer's own credential; amounts are the API's decimal strings,
// formatted as text (never through floating point). Only the chart's bar
// heights use numbers.
"use strict";

const MINOR = { JPY: 0, KRW: 0 };
const SYMBOL = { USD: "$", EUR: "€", GBP: "£" };

// The credential arrives in the URL fragment (never sent to a server or in
// a Referer), is kept for this tab only and removed from the address bar.
function takeToken() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem("tally-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem("tally-token");
}

const token = takeToken();

async function api(method, path, body) {
  const res = await fetch(path, {
    method,
    headers: Object.assign(
      { Authorization: "Bearer " + token },
      body === undefined ? {} : { "Content-Type": "application/json" }
    ),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (res.status === 204) return null;
  const data = await res.json().catch(() => ({}));
  if (!res.ok) {
    const err = new Error(data.message || res.statusText);
    err.code = data.code || String(res.status);
    throw err;
  }
  return data;
}

function money(v, cur) {
  if (v === null || v === undefined) return "—";
  let s = String(v);
  const neg = s.startsWith("-");
  if (neg) s = s.slice(1);
  let [int, frac = ""] = s.split(".");
  const digits = MINOR[cur] ?? 2;
  if (frac.length < digits) frac = frac.padEnd(digits, "0");
  int = int.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  const sym = SYMBOL[cur];
  const num = int + (frac ? "." + frac : "");
  return (neg ? "−" : "") + (sym ? sym + num : num + " " + cur);
}

const $ = (id) => document.querySelector(`[data-testid="${id}"]`);

function setMoney(el, v, cur) {
  el.textContent = money(v, cur);
  el.dataset.value = v === null || v === undefined ? "" : String(v);
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c);
  return e;
}

function moneyCell(v, cur, cls) {
  const td = el("td", { class: "num " + (cls || "") });
  setMoney(td, v, cur);
  return td;
}

function fillAmounts(table, rows, cur, label) {
  const body = table.querySelector("tbody");
  body.replaceChildren();
  if (rows.length === 0) {
    body.append(el("tr", {}, el("td", { class: "empty" }, "No usage yet")));
    return;
  }
  for (const r of rows) {
    body.append(
      el("tr", { "data-key": r.key }, el("td", {}, label(r.key)), moneyCell(r.amount, cur))
    );
  }
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function drawChart(container, daily, cur) {
  const W = 1000, H = 220, left = 56, bottom = 22, top = 10;
  const max = Math.max(0.01, ...daily.map((d) => Number(d.amount)));
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "Daily usage cost" });
  const plotH = H - bottom - top;
  for (const f of [0, 0.5, 1]) {
    const y = top + plotH * (1 - f);
    root.append(svg("line", { x1: left, x2: W, y1: y, y2: y, class: "axis" }));
    root.append(svg("text", { x: left - 6, y: y + 3, "text-anchor": "end" }, money((max * f).toFixed(2), cur)));
  }
  const slot = (W - left) / Math.max(daily.length, 1);
  daily.forEach((d, i) => {
    const h = (Number(d.amount) / max) * plotH;
    const x = left + i * slot + slot * 0.15;
    const bar = svg("rect", {
      class: "bar", x, width: slot * 0.7, y: top + plotH - Math.max(h, 0), height: Math.max(h, 0),
      "data-date": d.date, "data-value": d.amount,
    });
    bar.append(svg("title", {}, `${d.date}: ${money(d.amount, cur)}`));
    root.append(bar);
    if (daily.length <= 16 || i % 2 === 0) {
      root.append(svg("text", { x: x + slot * 0.35, y: H - 6, "text-anchor": "middle" }, d.date.slice(8)));
    }
  });
  container.replaceChildren(root);
}

let customer = null;

async function loadCosts() {
  const c = await api("GET", `/v1/customers/${encodeURIComponent(customer)}/costs`);
  const cur = c.currency;
  $("plan").textContent = c.plan ? `${c.plan.name} (v${c.plan.version})` : "no plan";
  $("period").textContent = `${c.period.start.slice(0, 10)} – ${c.period.end.slice(0, 10)} (UTC)`;
  setMoney($("month-to-date"), c.month_to_date, cur);
  $("mtd-split").textContent =
    `usage ${money(c.usage, cur)} · fees ${money(c.fees, cur)}` +
    (Number(c.plan_adjustments) !== 0 ? ` · plan minimum/maximum ${money(c.plan_adjustments, cur)}` : "");
  setMoney($("forecast"), c.forecast, cur);
  // Discounts, tax and credit, as the month's invoice would settle them.
  const st = c.settlement;
  const steps = (d, t, total) =>
    (Number(d) !== 0 ? `discounts ${money(d, cur)} · ` : "") +
    (Number(t) !== 0 ? `tax ${money(t, cur)} · ` : "") + `total ${money(total, cur)}`;
  $("mtd-split").textContent += ` · ${steps(st.month_to_date_discounts, st.month_to_date_tax, st.month_to_date_total)}`;
  $("forecast-split").textContent = steps(st.forecast_discounts, st.forecast_tax, st.forecast_total);
  setMoney($("credit-balance"), st.credit_balance, cur);
  $("credit-expiring").textContent = st.credit_expiring.length
    ? st.credit_expiring.map((e) => `${money(e.remaining, cur)} expires ${e.expires_at.slice(0, 10)}`).join(" · ")
    : "nothing expires in the next 30 days";
  $("forecast-due").textContent =
    `credit would pay ${money(st.forecast_credit.replace(/^-/, ""), cur)} of the forecast; due ${money(st.forecast_due, cur)}`;
  $("forecast-due").dataset.value = st.forecast_due;
  setMoney($("spending-cap"), c.spending_cap, cur);
  if (c.spending_cap === null) $("spending-cap").textContent = "No cap";
  $("cap-note").textContent = c.own_spending_cap !== null
    ? "set by you"
    : c.spending_cap !== null ? "your plan's default" : "scale-ups are not limited by cost";
  drawChart($("daily-chart"), c.daily, cur);
  fillAmounts($("by-meter"), c.by_meter, cur, (k) => k);
  fillAmounts($("by-app"), c.by_app, cur, (k) => k || "(no app)");
  $("as-of").textContent = `Usage through ${c.as_of.replace("T", " ").slice(0, 19)} UTC. ` +
    "Month to date includes the whole month's fees; the forecast assumes what runs now keeps running.";
  return c;
}

// As of the cost report's instant, so both tables show the same moment.
async function loadAdvisor(at) {
  const a = await api("GET",
    `/v1/customers/${encodeURIComponent(customer)}/plan-advisor?at=${encodeURIComponent(at)}`);
  const body = $("advisor").querySelector("tbody");
  body.replaceChildren();
  for (const p of a.plans) {
    const s = Number(p.saving);
    const name = el("td", {}, p.name + (p.contract ? " (your contract)" : "") + (p.current ? " (your plan)" : ""));
    if (!p.fits) name.append(el("div", { class: "note" }, p.note || "does not fit this usage"));
    const row = el("tr", { class: (p.current ? "current " : "") + (p.fits ? "" : "nofit"), "data-plan": p.plan },
      name,
      moneyCell(p.month_to_date, a.currency),
      moneyCell(p.forecast, a.currency),
      moneyCell(p.forecast_total, a.currency),
      p.fits
        ? moneyCell(p.saving, a.currency, s > 0 ? "saving" : s < 0 ? "loss" : "")
        : el("td", { class: "num", "data-value": p.saving }, "—"));
    body.append(row);
  }
}

// Trial, billing day, fees billed in advance, a scheduled or past
// cancellation or switch: what the
// subscription says beyond the plan's name (a contract is named in the
// advisor's table).
async function loadSubscription() {
  const s = await api("GET", `/v1/customers/${encodeURIComponent(customer)}/subscription`);
  const notes = [];
  const cur = s.current;
  if (cur && cur.trial_end && new Date(cur.trial_end) > new Date()) notes.push(`trial until ${cur.trial_end.slice(0, 10)}`);
  if (cur && cur.anchor_day && cur.anchor_day !== 1) notes.push(`billed from day ${cur.anchor_day} of each month`);
  if (cur) {
    const plans = await api("GET", "/v1/plans");
    const mine = plans.find((p) => p.plan.plan === cur.plan && p.plan.version === cur.version);
    if (mine && mine.plan.fee_timing === "in_advance") notes.push("fees billed in advance");
  }
  if (s.cancelled_at) {
    const when = s.cancelled_at.slice(0, 10);
    notes.push(new Date(s.cancelled_at) > new Date() ? `cancels on ${when}` : `cancelled on ${when}`);
  }
  for (const next of s.scheduled) notes.push(`switches to ${next.plan} on ${next.start.slice(0, 10)}`);
  $("lifecycle").textContent = notes.length ? `· ${notes.join(" · ")}` : "";
}

async function loadInvoices() {
  const list = await api("GET", `/v1/customers/${encodeURIComponent(customer)}/invoices`);
  const body = $("invoices").querySelector("tbody");
  body.replaceChildren();
  if (list.length === 0) {
    body.append(el("tr", {}, el("td", { class: "empty" }, "No invoices yet")));
    return;
  }
  list.sort((a, b) => b.seq - a.seq);
  for (const inv of list) {
    // A negative total (refunds of fees paid in advance) is carried to the
    // next invoice, never charged.
    const credit = inv.sync_status === "carried_forward" && inv.amount_due.startsWith("-");
    const status = inv.carried_to ? "carried forward" : credit ? "credit carried"
      : inv.sync_status === "nothing_due" && Number(inv.credit_total) !== 0 ? "paid by credit" : inv.payment_status;
    // An opening invoice bills fees in advance from the day they start.
    const period = inv.kind === "opening" ? `fees from ${inv.period.start.slice(0, 10)}`
      : inv.kind === "top_up" ? `credit bought ${inv.period.start.slice(0, 10)}` : inv.period.start.slice(0, 7);
    body.append(el("tr", { "data-invoice": inv.number },
      el("td", {}, inv.number),
      el("td", {}, period),
      el("td", {}, el("span", { class: "status " + inv.payment_status, "data-status": status }, status)),
      moneyCell(inv.discount_total, inv.currency),
      moneyCell(inv.tax_total, inv.currency),
      moneyCell(inv.total, inv.currency),
      moneyCell(inv.credit_total, inv.currency),
      moneyCell(inv.amount_due, inv.currency)));
  }
}

function showError(e) {
  const box = $("error");
  box.hidden = false;
  box.textContent = `${e.message} (${e.code || "error"})`;
}

async function setCap(value) {
  const status = $("cap-status");
  try {
    await api("PUT", `/v1/customers/${encodeURIComponent(customer)}/spending-cap`, { spending_cap: value });
    const c = await loadCosts();
    status.textContent = value === null ? "Cap removed; the plan's default applies." : `Cap set to ${money(value, c.currency)}.`;
    status.dataset.state = "saved";
  } catch (e) {
    status.textContent = e.message;
    status.dataset.state = "error";
  }
}

async function main() {
  if (!token) {
    showError({ message: "Open this page with a customer token: /dashboard#token=…", code: "unauthorized" });
    return;
  }
  $("cap-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const v = $("cap-input").value.trim();
    if (!/^\d{1,10}(\.\d{1,4})?$/.test(v)) {
      $("cap-status").textContent = "Enter an amount like 50 or 50.00";
      $("cap-status").dataset.state = "error";
      return;
    }
    setCap(v);
  });
  $("cap-clear").addEventListener("click", () => setCap(null));
  try {
    const me = await api("GET", "/v1/me");
    if (!me.customer_id) throw Object.assign(new Error("this page needs a customer credential"), { code: "forbidden" });
    customer = me.customer_id;
    $("customer").textContent = customer;
    const [c] = await Promise.all([loadCosts(), loadInvoices(), loadSubscription()]);
    await loadAdvisor(c.as_of);
    document.body.dataset.asOf = c.as_of;
    document.body.dataset.loaded = "true";
  } catch (e) {
    showError(e);
    document.body.dataset.loaded = "error";
  }
}

main();
