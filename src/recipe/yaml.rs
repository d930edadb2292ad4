//! What makes a YAML error readable: the depth check that runs before parsing, and serde_yaml's messages with the
//! location printed first and a duplicate key found at its own line.

/// The line and depth of the deepest nesting: indentation levels of block collections plus brackets of
/// flow collections (quoted text and comments aside). An estimate that never undercounts real nesting.
pub(super) fn deepest_nesting(text: &str) -> Option<(usize, usize)> {
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    let mut deepest: Option<(usize, usize)> = None;
    for (number, line) in text.lines().enumerate() {
        let content = line.trim_start();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        if flow == 0 {
            let indent = line.len() - content.len();
            while indents.last().is_some_and(|&i| i >= indent) {
                indents.pop();
            }
            indents.push(indent);
        }
        let mut quote: Option<char> = None;
        for c in content.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '#') => break,
                (None, '[' | '{') => flow += 1,
                (None, ']' | '}') => flow = flow.saturating_sub(1),
                _ => {}
            }
            let depth = indents.len() + flow;
            if deepest.is_none_or(|(_, d)| depth > d) {
                deepest = Some((number + 1, depth));
            }
        }
    }
    deepest
}

/// serde_yaml's message without the ` at line L column C` it appends (the location is printed first).
pub(super) fn without_location(error: &serde_yaml::Error) -> String {
    let message = error.to_string();
    match message.rfind(" at line ") {
        Some(i) if message[i..].contains(" column ") => message[..i].to_string(),
        _ => message,
    }
}

/// serde_yaml reports a duplicate key at the line of the mapping that holds it; the line of the second
/// occurrence of the key is what a person needs.
pub(super) fn duplicate_key_line(text: &str, error: &serde_yaml::Error) -> Option<usize> {
    let message = error.to_string();
    let key = message
        .split("duplicate field `")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
        .or_else(|| message.split("duplicate entry with key \"").nth(1)?.split('"').next())?;
    let from = error.location()?.line().saturating_sub(1);
    let is_key = |line: &str| {
        let content = line.trim_start();
        content.strip_prefix(key).is_some_and(|rest| rest.trim_start().starts_with(':'))
    };
    text.lines().enumerate().skip(from).filter(|(_, l)| is_key(l)).nth(1).map(|(i, _)| i + 1)
}
