// Where the report badges go under a node (pure: no DOM, no canvas; tested under Node).
//
// layoutBadges(badges, maxWidth, measure) -> [{x, y, width, height, lines, tone}]: short badges are pills side by
// side, wrapping to the next row at maxWidth; a badge too long for one row (a warning) gets a row of its own and
// its text is wrapped at word boundaries (a word longer than the row is cut between characters), so every word
// stays readable at any node width. `measure(text)` is the text's width in pixels (the canvas's measureText).

export const PILL = { height: 18, padding: 6, gap: 4, lineHeight: 14 };

// The lines of `text` that each fit in `width` pixels.
export function wrapText(text, width, measure) {
  const lines = [];
  let line = "";
  for (const word of String(text).split(/\s+/).filter(Boolean)) {
    const candidate = line ? `${line} ${word}` : word;
    if (measure(candidate) <= width) {
      line = candidate;
      continue;
    }
    if (line) lines.push(line);
    line = "";
    let rest = word;
    while (measure(rest) > width && rest.length > 1) { // a word wider than the row: cut it between characters
      let cut = rest.length - 1;
      while (cut > 1 && measure(rest.slice(0, cut)) > width) cut -= 1;
      lines.push(rest.slice(0, cut));
      rest = rest.slice(cut);
    }
    line = rest;
  }
  if (line) lines.push(line);
  return lines.length ? lines : [""];
}

export function layoutBadges(badges, maxWidth, measure) {
  const { height, padding, gap, lineHeight } = PILL;
  const placed = [];
  let x = 0;
  let y = 0;
  let rowHeight = 0;
  const newRow = () => {
    if (x > 0) y += rowHeight + gap;
    x = 0;
    rowHeight = 0;
  };
  for (const { text, tone } of badges) {
    const width = measure(text) + 2 * padding;
    if (width <= maxWidth) {
      if (x > 0 && x + width > maxWidth) newRow();
      placed.push({ x, y, width, height, lines: [text], tone });
      x += width + gap;
      rowHeight = Math.max(rowHeight, height);
      continue;
    }
    newRow();
    const lines = wrapText(text, maxWidth - 2 * padding, measure);
    const tall = lines.length * lineHeight + (height - lineHeight);
    placed.push({ x: 0, y, width: Math.max(...lines.map(measure)) + 2 * padding, height: tall, lines, tone });
    x = maxWidth; // the next badge starts a new row
    rowHeight = tall;
  }
  return placed;
}
