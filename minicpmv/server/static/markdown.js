// A small Markdown renderer that builds DOM nodes directly: every piece of model text becomes a
// text node (never HTML), so nothing the model writes can inject markup or script. It covers
// what chat answers use: fenced code, headings, lists (nested by indentation), block quotes,
// rules, paragraphs; inline code, math kept verbatim ($...$, $$...$$, \(...\), \[...\]),
// **bold**, *italic*, ~~strike~~ and [links](https://...) (http, https and mailto only).
"use strict";
(function (global) {
  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
  const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^ {0,3}([-*_])( *\1){2,} *$/;
  const ITEM = /^( {0,3})([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const QUOTE = /^ {0,3}> ?(.*)$/;
  const SAFE_URL = /^(https?:\/\/|mailto:)/i;

  function el(tag, cls, children) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    for (const child of children || []) node.append(child);
    return node;
  }

  function renderMarkdown(text) {
    const frag = document.createDocumentFragment();
    for (const block of blocks(text.split("\n"))) frag.append(block);
    return frag;
  }

  function blocks(lines) {
    const out = [];
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if (!line.trim()) { i++; continue; }
      if ((m = FENCE.exec(line))) {
        const body = [];
        i++;
        while (i < lines.length && !lines[i].trimStart().startsWith(m[1])) body.push(lines[i++]);
        i++;
        const code = el("code", m[2] ? "language-" + m[2] : "", [body.join("\n")]);
        out.push(el("pre", "", [code]));
      } else if ((m = HEADING.exec(line))) {
        out.push(el("h" + Math.min(m[1].length + 2, 6), "", inline(m[2])));
        i++;
      } else if (RULE.test(line)) {
        out.push(el("hr"));
        i++;
      } else if (QUOTE.test(line)) {
        const body = [];
        while (i < lines.length && (m = QUOTE.exec(lines[i]))) { body.push(m[1]); i++; }
        out.push(el("blockquote", "", blocks(body)));
      } else if ((m = ITEM.exec(line))) {
        const ordered = /\d/.test(m[2]);
        const list = el(ordered ? "ol" : "ul");
        if (ordered && parseInt(m[2], 10) !== 1) list.start = parseInt(m[2], 10);
        const indent = m[1].length;
        while (i < lines.length && (m = ITEM.exec(lines[i])) && m[1].length === indent && /\d/.test(m[2]) === ordered) {
          const body = [m[3]];
          i++;
          while (i < lines.length && (lines[i].startsWith("  ") || (!lines[i].trim() && i + 1 < lines.length
                 && lines[i + 1].startsWith("  ")))) {
            body.push(lines[i].replace(/^ {1,4}/, ""));
            i++;
          }
          list.append(el("li", "", body.length === 1 ? inline(body[0]) : blocks(body)));
        }
        out.push(list);
      } else {
        const body = [];
        while (i < lines.length && lines[i].trim() && !FENCE.test(lines[i]) && !HEADING.test(lines[i])
               && !QUOTE.test(lines[i]) && !(body.length && ITEM.test(lines[i]))) body.push(lines[i++]);
        out.push(el("p", "", inline(body.join("\n"))));
      }
    }
    return out;
  }

  // Inline spans, left to right; each rule finds its own closing delimiter.
  function inline(s) {
    const out = [];
    let text = "";
    const flush = () => { if (text) { appendText(out, text); text = ""; } };
    let i = 0;
    while (i < s.length) {
      const c = s[i];
      let span = null;
      if (c === "`") span = codeSpan(s, i);
      else if (c === "$" || (c === "\\" && (s[i + 1] === "(" || s[i + 1] === "["))) span = mathSpan(s, i);
      else if (c === "\\" && i + 1 < s.length && /[!-\/:-@\[-`{-~]/.test(s[i + 1])) { text += s[i + 1]; i += 2; continue; }
      else if (c === "*" || c === "_" || c === "~") span = emphasis(s, i);
      else if (c === "[") span = link(s, i);
      if (span) { flush(); out.push(span.node); i = span.end; } else { text += c; i++; }
    }
    flush();
    return out;
  }

  function appendText(out, text) {  // single newlines inside a paragraph stay line breaks
    text.split("\n").forEach((part, k) => { if (k) out.push(el("br")); if (part) out.push(document.createTextNode(part)); });
  }

  function codeSpan(s, i) {
    let k = 0;
    while (s[i + k] === "`") k++;
    const ticks = "`".repeat(k);
    let j = i + k;
    while ((j = s.indexOf(ticks, j)) >= 0) {
      if (s[j + k] !== "`" && s[j - 1] !== "`") return { node: el("code", "", [s.slice(i + k, j)]), end: j + k };
      while (s[j] === "`") j++;
    }
    return null;
  }

  function mathSpan(s, i) {
    const pairs = [["$$", "$$"], ["\\[", "\\]"], ["\\(", "\\)"], ["$", "$"]];
    for (const [open, close] of pairs) {
      if (!s.startsWith(open, i)) continue;
      const j = s.indexOf(close, i + open.length);
      if (j < 0) return null;
      if (open === "$") {
        const inner = s.slice(i + 1, j);
        if (!inner || /^\s|\s$|\n/.test(inner) || /\d/.test(s[j + 1] || "")) return null;
      }
      return { node: el("span", "math", [s.slice(i, j + close.length)]), end: j + close.length };
    }
    return null;
  }

  function emphasis(s, i) {
    for (const [mark, tag] of [["**", "strong"], ["__", "strong"], ["~~", "del"], ["*", "em"], ["_", "em"]]) {
      if (!s.startsWith(mark, i) || /\s/.test(s[i + mark.length] || " ")) continue;
      if (mark === "_" || mark === "__") {
        if (/\w/.test(s[i - 1] || "")) continue;  // snake_case stays as written
      }
      let j = s.indexOf(mark, i + mark.length);
      while (j >= 0 && (/\s/.test(s[j - 1]) || (mark.length === 1 && s[j + 1] === mark))) j = s.indexOf(mark, j + 2);
      if (j < 0) continue;
      return { node: el(tag, "", inline(s.slice(i + mark.length, j))), end: j + mark.length };
    }
    return null;
  }

  function link(s, i) {
    const m = /^\[([^\]\n]+)\]\(([^)\s]+)\)/.exec(s.slice(i));
    if (!m || !SAFE_URL.test(m[2])) return null;
    const a = el("a", "", inline(m[1]));
    a.href = m[2];
    a.target = "_blank";
    a.rel = "noopener noreferrer";
    return { node: a, end: i + m[0].length };
  }

  global.renderMarkdown = renderMarkdown;
})(window);
