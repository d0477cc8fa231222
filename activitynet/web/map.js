// The live network map: polls this server's /networkz every second and draws every server as a
// node and every link as an edge, laid out as a tree (deterministic: same network, same picture).
// Servers whose monitor address is known are asked for their own /varz (load, activity rate);
// a server that leaves the network stays on the map, greyed out, for GONE_KEEP_MS.
"use strict";

const POLL_MS = 1000;
const FETCH_TIMEOUT_MS = 900;
const GONE_KEEP_MS = 30000;
const MAX_ASKED = 32;  // other servers' monitors asked for their /varz each second, at most
const COLUMN = 170, ROW = 140, MARGIN = 70, RADIUS = 24, LABEL_BELOW = RADIUS + 42;
const SVG_NS = "http://www.w3.org/2000/svg";

const page = {
  network: null,          // the last /networkz answer
  remote: new Map(),      // address -> the last /varz of that server's own monitor
  gone: new Map(),        // address -> {server, since}: servers that left the network
  selected: null,         // address of the server whose figures are shown
  lastOk: null,           // time of the last answer from this server's monitor
};

async function getJSON(url) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), FETCH_TIMEOUT_MS);
  try {
    const answer = await fetch(url, {cache: "no-store", signal: controller.signal});
    if (!answer.ok) throw new Error(`${url}: HTTP ${answer.status}`);
    return await answer.json();
  } finally {
    clearTimeout(timer);
  }
}

function varzURL(server) {
  if (server.self) return "varz";
  return server.monitor ? `http://${server.monitor}/varz` : null;
}

// --- layout: plain data in, positions out ---------------------------------------------------------

// Trees by breadth-first search from the root (the map's root, else this server), then from the
// smallest address of each part not reached; children in address order. Leaves take one column
// each in depth-first order, a parent sits above the middle of its children.
function layout(servers, links, root) {
  const neighbours = new Map(servers.map((s) => [s.address, []]));
  for (const link of links) {
    if (neighbours.has(link.a) && neighbours.has(link.b)) {
      neighbours.get(link.a).push(link.b);
      neighbours.get(link.b).push(link.a);
    }
  }
  for (const list of neighbours.values()) list.sort();
  const position = new Map();
  const children = new Map();
  const placed = new Set();
  let column = 0, depth = 0;
  const starts = [root, ...[...neighbours.keys()].sort()].filter((a) => neighbours.has(a));
  for (const start of starts) {
    if (placed.has(start)) continue;
    placed.add(start);
    const queue = [[start, 0]];
    while (queue.length) {
      const [address, level] = queue.shift();
      depth = Math.max(depth, level);
      const kids = neighbours.get(address).filter((n) => !placed.has(n));
      kids.forEach((kid) => { placed.add(kid); queue.push([kid, level + 1]); });
      children.set(address, kids);
      position.set(address, {level});
    }
    const place = (address) => {
      const kids = children.get(address);
      if (!kids.length) {
        position.get(address).column = column++;
      } else {
        kids.forEach(place);
        const first = position.get(kids[0]).column, last = position.get(kids[kids.length - 1]).column;
        position.get(address).column = (first + last) / 2;
      }
    };
    place(start);
    column += 0.5;  // a gap between separate parts of the network
  }
  const points = new Map();
  for (const [address, p] of position) {
    points.set(address, {x: MARGIN + p.column * COLUMN, y: MARGIN + p.level * ROW});
  }
  return {points, width: 2 * MARGIN + Math.max(0, column - 1.5) * COLUMN,
          height: 2 * MARGIN + depth * ROW + 20};
}

// --- drawing -----------------------------------------------------------------------------------------

function svg(tag, attributes, parent) {
  const element = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (parent) parent.appendChild(element);
  return element;
}

function describe(known) {
  const load = `${known.load ?? "?"} clients`;
  if (known.rate === null || known.rate === undefined) return load;
  return `${load} · ${known.rate >= 10 ? Math.round(known.rate) : known.rate.toFixed(1)} act/s`;
}

// What is known of a server: its own monitor's /varz if it answered, else the map's entry.
function figures(server) {
  const remote = page.remote.get(server.address);
  if (remote && !server.self) {
    return {load: remote.counts.clients, rate: remote.rates.activities_from_clients_per_s};
  }
  return {load: server.load, rate: server.activities_per_s};
}

function draw() {
  const network = page.network;
  const map = document.getElementById("map");
  if (!network) return;
  const now = Date.now();
  const servers = network.servers.filter((s) => s.alive !== false);
  const live = new Set(servers.map((s) => s.address));
  for (const [address, entry] of page.gone) {
    if (live.has(address) || now - entry.since > GONE_KEEP_MS) page.gone.delete(address);
  }
  for (const server of network.servers) {
    if (server.alive === false && !page.gone.has(server.address)) {
      page.gone.set(server.address, {server, since: now});
    }
  }
  const all = servers.concat([...page.gone.values()].map((g) => ({...g.server, gone: true})));
  const links = network.links.filter((l) => live.has(l.a) && live.has(l.b));
  const {points, width, height} = layout(all, links, network.root || network.self);
  map.setAttribute("viewBox", `0 0 ${Math.max(width, 400)} ${Math.max(height, 260)}`);
  map.replaceChildren();
  const edges = svg("g", {class: "edges"}, map);
  for (const link of links) {
    let a = points.get(link.a), b = points.get(link.b);
    if (a.y > b.y) [a, b] = [b, a];
    // from below the upper server's label to the top of the lower one, so no text is crossed
    const [y1, y2] = a.y < b.y ? [a.y + LABEL_BELOW, b.y - RADIUS] : [a.y, b.y];
    const state = link.live === false ? " catching-up" : "";
    const line = svg("line", {class: "edge" + state, x1: a.x, y1, x2: b.x, y2,
                              "data-a": link.a, "data-b": link.b}, edges);
    svg("title", {}, line).textContent = `${link.a} - ${link.b}` + (link.phase ? ` (${link.phase})` : "");
  }
  const nodes = svg("g", {class: "nodes"}, map);
  for (const server of all) {
    const p = points.get(server.address);
    const classes = ["node"];
    if (server.self) classes.push("self");
    if (server.gone) classes.push("gone");
    if (server.address === page.selected) classes.push("selected");
    const group = svg("g", {class: classes.join(" "), "data-address": server.address,
                            transform: `translate(${p.x},${p.y})`, tabindex: "0"}, nodes);
    const known = figures(server);
    svg("circle", {r: RADIUS}, group);
    svg("text", {class: "load", y: 0}, group).textContent = known.load ?? "?";
    svg("text", {class: "name", y: RADIUS + 17}, group).textContent = server.address;
    svg("text", {class: "figures", y: RADIUS + 33}, group).textContent = server.gone
      ? "gone" : describe(known);
    svg("title", {}, group).textContent = `${server.address}: click for its figures`;
    group.addEventListener("click", () => select(server.address));
    group.addEventListener("keydown", (event) => { if (event.key === "Enter") select(server.address); });
  }
  map.dataset.servers = String(servers.length);
  map.dataset.links = String(links.length);
}

// --- details of one server -------------------------------------------------------------------------

function select(address) {
  page.selected = address;
  draw();
  showDetails();
}

function table(title, rows, body) {
  const heading = document.createElement("h3");
  heading.textContent = title;
  const element = document.createElement("table");
  for (const [key, value] of rows) {
    const row = element.insertRow();
    row.insertCell().textContent = key.replaceAll("_", " ");
    row.insertCell().textContent = typeof value === "object" && value !== null ? JSON.stringify(value) : String(value ?? "?");
  }
  body.append(heading, element);
}

async function showDetails() {
  const address = page.selected;
  const network = page.network;
  if (!address || !network) return;
  const server = network.servers.find((s) => s.address === address)
    || (page.gone.get(address) || {}).server;
  const title = document.getElementById("details-title");
  const note = document.getElementById("details-note");
  const body = document.createElement("div");
  body.id = "details-body";
  title.textContent = address;
  let varz = null;
  const url = server && !page.gone.has(address) ? varzURL(server) : null;
  if (url) {
    try {
      varz = await getJSON(url);
    } catch (error) {
      varz = null;
    }
  }
  if (page.selected !== address) return;  // another server was clicked meanwhile
  if (varz) {
    note.textContent = server.self ? "This server's /varz." : `/varz of its monitor at ${server.monitor}.`;
    const general = Object.entries(varz.server).filter(([key]) => key !== "started_at");
    table("server", general, body);
    table("counts", Object.entries(varz.counts), body);
    table("rates (per second)", Object.entries(varz.rates), body);
    const counters = Object.entries(varz.counters).filter(([key]) => key !== "invalid_messages");
    table("counters since start", counters, body);
    table("INVALID_MESSAGE by reason", Object.entries(varz.counters.invalid_messages), body);
  } else if (server) {
    note.textContent = page.gone.has(address)
      ? "This server has left the network; its last known figures:"
      : "Its monitor is not known here; what this server knows about it:";
    table("as seen from here", Object.entries(server).filter(([key]) => key !== "self"), body);
  } else {
    note.textContent = "This server is no longer on the map.";
  }
  document.getElementById("details-body").replaceWith(body);
}

// --- the loop ---------------------------------------------------------------------------------------------

async function refreshRemote(network) {
  const asks = network.servers.filter((s) => !s.self && s.monitor && s.alive !== false).slice(0, MAX_ASKED);
  await Promise.all(asks.map(async (server) => {
    try {
      page.remote.set(server.address, await getJSON(varzURL(server)));
    } catch (error) {
      page.remote.delete(server.address);
    }
  }));
}

function forget(previous, network) {
  // servers that were on the map and are not any more: keep them greyed out for a while
  const now = new Set(network.servers.map((s) => s.address));
  for (const server of previous ? previous.servers : []) {
    if (!now.has(server.address) && !page.gone.has(server.address)) {
      page.gone.set(server.address, {server, since: Date.now()});
    }
  }
}

async function poll() {
  const status = document.getElementById("status");
  try {
    const network = await getJSON("networkz");
    forget(page.network, network);
    page.network = network;
    page.lastOk = new Date();
    document.body.classList.remove("offline");
    document.getElementById("self-address").textContent = network.self;
    const alive = network.servers.filter((s) => s.alive !== false).length;
    const seen = network.source === "network map" ? "the whole network" : "this server and its neighbours";
    status.textContent = `${alive} servers, ${network.links.length} links (${seen}) · updated ` +
      page.lastOk.toLocaleTimeString();
    await refreshRemote(network);
    draw();
    if (page.selected) showDetails();
  } catch (error) {
    document.body.classList.add("offline");
    status.textContent = "this server's monitor is not answering" +
      (page.lastOk ? ` since ${page.lastOk.toLocaleTimeString()}` : "");
  }
  setTimeout(poll, POLL_MS);
}

poll();
