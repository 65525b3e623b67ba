// The trial report page. It holds no data of its own: everything is fetched from this
// server's operations with the user's bearer token, which lives in this tab's
// sessionStorage only (never localStorage, never a cookie, never a URL sent anywhere).
"use strict";

const TOKEN_KEY = "itp-report-token";
const SVG_NS = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

// A token in the URL fragment (#token=...) is taken, then removed from the address bar, so
// it is neither bookmarked nor shown; a fragment never reaches the server.
function takeFragmentToken() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  const token = fragment.get("token");
  if (token) {
    sessionStorage.setItem(TOKEN_KEY, token.trim());
    history.replaceState(null, "", location.pathname + location.search);
  }
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function say(text, isError = false) {
  const message = $("message");
  message.textContent = text;
  message.classList.toggle("error", isError);
}

// The page's own ?site=... narrows every operation it calls.
function withSites(path) {
  const sites = new URLSearchParams(location.search).getAll("site");
  if (!sites.length) return path;
  const query = new URLSearchParams();
  sites.forEach((site) => query.append("site", site));
  return path + "?" + query.toString();
}

class ApiError extends Error {}

async function api(path, accept) {
  const response = await fetch(path, {
    headers: { Authorization: "Bearer " + token(), Accept: accept },
    cache: "no-store",
  });
  if (!response.ok) {
    let detail = response.statusText;
    try {
      const outcome = await response.json();
      detail = outcome.issue.map((issue) => issue.diagnostics).join("; ");
    } catch (ignored) {
      // not an OperationOutcome: the status text says enough
    }
    throw new ApiError(`${response.status}: ${detail}`);
  }
  return response;
}

const pct = (x) => (x === null ? "–" : (100 * x).toFixed(1) + "%");
const num = (x, digits = 0) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));

function proportionText(p) {
  if (p.n === 0) return "no treated patient";
  return `${p.responders}/${p.n} = ${pct(p.rate)} (95% CI ${pct(p.ci95_low)} to ${pct(p.ci95_high)})`;
}

function setProportion(element, p) {
  element.textContent = proportionText(p);
  element.dataset.rate = String(p.rate);
  element.dataset.low = String(p.ci95_low);
  element.dataset.high = String(p.ci95_high);
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "–" : String(text);
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function statusBadge(row, code) {
  const td = cell(row, "");
  if (code) {
    const span = document.createElement("span");
    span.className = "status status-" + code;
    span.textContent = code;
    td.appendChild(span);
  } else {
    td.textContent = "–";
  }
}

// The status codes in the order the tables' columns list them.
const STATUS_CODES = ["CR", "R", "NR", "LOR", "NE"];

// Replaces the rows of table `id` with one row per item, which `fill(row, item)` fills.
function fillTable(id, items, fill) {
  const body = $(id).tBodies[0];
  body.replaceChildren();
  for (const item of items) fill(body.insertRow(), item);
}

function statusCells(row, counts) {
  for (const code of STATUS_CODES) cell(row, counts[code]);
}

function renderSummary(report) {
  $("scope").textContent = report.sites.length
    ? "sites " + report.sites.join(", ")
    : "no site";
  $("n-enrolled").textContent = report.n_enrolled;
  $("n-treated").textContent = report.n_treated;
  $("n-evaluable").textContent = report.n_evaluable;
  setProportion($("orr"), report.orr);
  setProportion($("cr-rate"), report.cr_rate);
  const ttr = report.time_to_response_days;
  $("ttr").textContent = ttr.n ? `${num(ttr.median, 1)} d (${ttr.min} to ${ttr.max})` : "–";
  const dor = report.duration_of_response_days;
  const reached = (x) => (x === null ? "not reached" : num(x) + " d");
  $("dor").textContent = dor.n
    ? `${reached(dor.median)} (${reached(dor.ci95_low)} to ${reached(dor.ci95_high)}); ` +
      `${dor.events} losses in ${dor.n} responders`
    : "no responder";
  const platelets = report.platelets;
  $("platelets").textContent =
    `${num(platelets.baseline_median, 1)} / ${num(platelets.peak_median, 1)} ×10⁹/L`;
  const ae = report.adverse_events;
  $("aes").textContent = `${ae.events} (${ae.patients}); serious ${ae.serious}, related ${ae.related}`;
  const statuses = [["Current status", report.status], ["Best response", report.best_response]];
  fillTable("status-counts", statuses, (row, [label, counts]) => {
    cell(row, label);
    statusCells(row, counts);
  });
}

function renderSites(report) {
  fillTable("sites", report.by_site, (row, site) => {
    row.dataset.site = site.site;
    cell(row, site.site);
    cell(row, site.n_enrolled);
    cell(row, site.n_treated);
    statusCells(row, site.status);
    cell(row, proportionText(site.orr));
    cell(row, site.adverse_events.events);
  });
}

function renderListing(listing) {
  fillTable("listing", listing.rows, (row, patient) => {
    row.dataset.patient = patient.patient;
    row.title = "Show the platelet counts of " + (patient.subject || patient.patient);
    cell(row, patient.subject || patient.patient);
    cell(row, patient.site);
    cell(row, patient.treatment_start ? patient.treatment_start.slice(0, 10) : null);
    cell(row, num(patient.baseline, 1));
    statusBadge(row, patient.status);
    statusBadge(row, patient.best_response);
    cell(row, patient.response_date);
    cell(row, patient.time_to_response_days);
    cell(row, patient.time_to_complete_response_days);
    cell(row, patient.duration_of_response_days);
    cell(row, num(patient.peak_count, 1));
    cell(row, patient.rescue_count);
    cell(row, patient.adverse_events);
    const action = cell(row, "");
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = "Chart";
    action.appendChild(button);
    row.addEventListener("click", () => openChart(patient.patient, patient.subject));
  });
}

// The server's SVG, parsed as XML and adopted into the page (never as HTML): the page can
// then find a lane or a count's marker by its id.
async function insertSvg(container, path) {
  const text = await (await api(path, "image/svg+xml")).text();
  const parsed = new DOMParser().parseFromString(text, "image/svg+xml");
  const svg = parsed.documentElement;
  if (svg.namespaceURI !== SVG_NS || svg.localName !== "svg") {
    throw new ApiError("the server's picture is not SVG");
  }
  container.replaceChildren(document.importNode(svg, true));
  return container.firstElementChild;
}

async function openChart(patientId, subject) {
  const dialog = $("chart-dialog");
  $("chart-title").textContent = "Platelet counts: " + (subject || patientId);
  $("chart").replaceChildren();
  if (!dialog.open) dialog.showModal();
  try {
    const svg = await insertSvg($("chart"), `/fhir/Patient/${encodeURIComponent(patientId)}/$platelet-chart`);
    svg.dataset.patient = patientId;
  } catch (error) {
    $("chart").textContent = "The chart could not be loaded: " + error.message;
  }
}

async function showReport() {
  if (!token()) {
    $("report").hidden = true;
    say("Paste a token (or open this page as /report#token=...) to see the report.");
    return;
  }
  say("Loading the report...");
  try {
    const [report, listing] = await Promise.all([
      api(withSites("/fhir/$trial-report"), "application/json").then((r) => r.json()),
      api(withSites("/fhir/$response-listing"), "application/json").then((r) => r.json()),
    ]);
    renderSummary(report);
    renderSites(report);
    renderListing(listing);
    $("report").hidden = false;
    const swimmer = await insertSvg($("swimmer"), withSites("/fhir/$swimmer-plot"));
    swimmer.querySelectorAll('g[id^="lane-"]').forEach((lane) => {
      const patientId = lane.id.slice("lane-".length);
      const row = listing.rows.find((r) => r.patient === patientId);
      lane.addEventListener("click", () => openChart(patientId, row ? row.subject : null));
    });
    say(`Report generated ${report.generated_at}.`);
  } catch (error) {
    $("report").hidden = true;
    say("The report could not be loaded: " + error.message, true);
  }
}

async function downloadCsv() {
  try {
    const blob = await (await api(withSites("/fhir/$response-listing"), "text/csv")).blob();
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = "response-listing.csv";
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 1000);
  } catch (error) {
    say("The listing could not be downloaded: " + error.message, true);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  takeFragmentToken();
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token-input").value.trim();
    $("token-input").value = "";
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    showReport();
  });
  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    for (const id of ["swimmer", "chart"]) $(id).replaceChildren();
    for (const id of ["sites", "listing", "status-counts"]) $(id).tBodies[0].replaceChildren();
    showReport();
  });
  $("csv").addEventListener("click", downloadCsv);
  showReport();
});
