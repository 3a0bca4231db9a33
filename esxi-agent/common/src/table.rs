//! Plain-text tables, as the original's admin CLI printed them.

/// Renders a table the way the original's `cli_table` did: a header line,
/// a line of dashes under each header, then the rows, columns separated by
/// two spaces and padded to the widest cell. Ends with a newline.
pub fn render_table<S: AsRef<str>>(headers: &[&str], rows: &[Vec<S>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.as_ref().chars().count());
        }
    }
    let mut out = String::with_capacity((rows.len() + 2) * (widths.iter().sum::<usize>() + 2 * widths.len()));
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let start = out.len();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            out.push_str(cell);
            for _ in cell.chars().count()..*w {
                out.push(' ');
            }
        }
        let end = out[start..].trim_end_matches(' ').len() + start;
        out.truncate(end);
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    let dashes: Vec<String> = headers.iter().map(|h| "-".repeat(h.chars().count())).collect();
    line(&mut dashes.iter().map(String::as_str));
    for row in rows {
        line(&mut row.iter().map(AsRef::as_ref));
    }
    out
}
