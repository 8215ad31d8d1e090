//! Line numbers of field paths. serde_yaml reports locations for parse errors only, so a
//! finding's line comes from a light scan of the document's text: each `key` of the path
//! is looked up among the lines of its parent block at the block's own indentation, each
//! `[i]` as the i-th `- ` item of the block. Block-style YAML is located exactly; where a
//! path goes into a flow collection (`{..}`, `[..]` on one line) the line of the last
//! field found is given.

/// One non-blank, non-comment line: its number, indentation and text.
struct Line<'a> {
    no: usize,
    indent: usize,
    text: &'a str,
}

enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

fn segments(path: &str) -> Vec<Seg<'_>> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, rest) = part.split_at(part.find('[').unwrap_or(part.len()));
        if !key.is_empty() {
            out.push(Seg::Key(key));
        }
        for idx in rest.split('[').filter(|s| !s.is_empty()) {
            if let Ok(i) = idx.trim_end_matches(']').parse() {
                out.push(Seg::Index(i));
            }
        }
    }
    out
}

/// The column where a line's mapping content starts, after any `- ` item markers.
fn content<'a>(l: &Line<'a>) -> (usize, &'a str) {
    let mut col = l.indent;
    let mut text = l.text;
    while let Some(rest) = text.strip_prefix('-') {
        if !(rest.is_empty() || rest.starts_with(' ')) {
            break;
        }
        let trimmed = rest.trim_start();
        col += 1 + (rest.len() - trimmed.len());
        text = trimmed;
    }
    (col, text)
}

fn is_key(text: &str, key: &str) -> bool {
    let unquoted = text
        .strip_prefix('"')
        .and_then(|t| t.strip_prefix(key))
        .and_then(|t| t.strip_prefix('"'))
        .or_else(|| {
            text.strip_prefix('\'')
                .and_then(|t| t.strip_prefix(key))
                .and_then(|t| t.strip_prefix('\''))
        })
        .or_else(|| text.strip_prefix(key));
    unquoted.is_some_and(|t| t.starts_with(':'))
}

/// The line of `path` in a document whose first line is `start`.
pub fn line_of(doc: &str, start: usize, path: &str) -> usize {
    let lines: Vec<Line> = doc
        .lines()
        .enumerate()
        .filter_map(|(i, raw)| {
            let text = raw.trim_start();
            (!text.is_empty() && !text.starts_with('#')).then(|| Line {
                no: start + i,
                indent: raw.len() - text.len(),
                text,
            })
        })
        .collect();
    let (mut lo, mut hi) = (0, lines.len());
    let mut found = lines.first().map_or(start, |l| l.no);
    for seg in segments(path) {
        let block = &lines[lo..hi];
        match seg {
            Seg::Key(key) => {
                let Some(level) = block.iter().map(|l| content(l).0).min() else {
                    return found;
                };
                let Some(j) = block.iter().position(|l| {
                    let (col, text) = content(l);
                    col == level && is_key(text, key)
                }) else {
                    return found;
                };
                found = block[j].no;
                let col = content(&block[j]).0;
                let end = block[j + 1..]
                    .iter()
                    .position(|l| l.indent < col || (l.indent == col && !l.text.starts_with('-')))
                    .map_or(hi, |k| lo + j + 1 + k);
                (lo, hi) = (lo + j + 1, end);
            }
            Seg::Index(i) => {
                let Some(level) = block.iter().map(|l| l.indent).min() else {
                    return found;
                };
                let items: Vec<usize> = block
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| l.indent == level && l.text.starts_with('-'))
                    .map(|(k, _)| k)
                    .collect();
                let Some(&j) = items.get(i) else {
                    return found;
                };
                found = block[j].no;
                // the item's lines: its first line holds its first key after the `- `
                let end = items.get(i + 1).map_or(hi, |k| lo + k);
                (lo, hi) = (lo + j, end);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: x
spec:
  podSelector: {}
  # a comment
  ingress:
  - from:
    - namespaceSelector:
        matchLabels: {team: a}
    - podSelector:
        matchLabels: {app: b}
    ports:
      - port: 80
  - from: [{podSelector: {}}]
  egress:
    - to:
        - ipBlock: {cidr: 10.0.0.0/8}
";

    #[test]
    fn block_paths_are_found_and_flow_ones_fall_back() {
        assert_eq!(line_of(DOC, 10, "spec"), 14);
        assert_eq!(line_of(DOC, 10, "metadata.name"), 13);
        assert_eq!(line_of(DOC, 10, "spec.ingress"), 17);
        assert_eq!(line_of(DOC, 10, "spec.ingress[0]"), 18);
        assert_eq!(line_of(DOC, 10, "spec.ingress[0].from[0]"), 19);
        assert_eq!(line_of(DOC, 10, "spec.ingress[0].from[1]"), 21);
        assert_eq!(line_of(DOC, 10, "spec.ingress[0].from[1].podSelector"), 21);
        assert_eq!(line_of(DOC, 10, "spec.ingress[0].ports[0]"), 24);
        assert_eq!(line_of(DOC, 10, "spec.ingress[1]"), 25);
        assert_eq!(line_of(DOC, 10, "spec.ingress[1].from[0]"), 25);
        assert_eq!(line_of(DOC, 10, "spec.egress[0].to[0]"), 28);
        assert_eq!(line_of(DOC, 10, "spec.egress[0].to[0].ipBlock"), 28);
        assert_eq!(line_of(DOC, 10, "spec.nothing"), 14);
    }
}
