//! `INFERGATE__A__B=value` environment overrides applied to the config
//! file's TOML before it is checked.

/// Set `a__b__0__c` in `table`, creating tables on the way; a numeric part
/// indexes a list (`pools__0__workers`). Values parse as TOML scalars
/// (numbers, booleans) and fall back to strings.
pub(super) fn apply(table: &mut toml::Table, key: &str, raw: &str) -> Result<(), String> {
    let parts: Vec<String> = key.split("__").map(str::to_ascii_lowercase).collect();
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()));
    set_path(table, &parts, value)
}

fn set_path(table: &mut toml::Table, parts: &[String], value: toml::Value) -> Result<(), String> {
    let [head, rest @ ..] = parts else {
        return Err("empty key".into());
    };
    if rest.is_empty() {
        table.insert(head.clone(), value);
        return Ok(());
    }
    match table.entry(head.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new())) {
        toml::Value::Table(t) => set_path(t, rest, value),
        toml::Value::Array(items) => {
            let [idx, rest @ ..] = rest else {
                return Err(format!("`{head}` is a list"));
            };
            let idx: usize = idx.parse().map_err(|_| format!("`{head}` is a list: use {head}__N__field"))?;
            match items.get_mut(idx) {
                Some(toml::Value::Table(t)) if !rest.is_empty() => set_path(t, rest, value),
                Some(_) => Err(format!("cannot replace `{head}[{idx}]` as a whole")),
                None => Err(format!("`{head}` has no entry {idx}")),
            }
        }
        _ => Err(format!("`{head}` is not a table")),
    }
}
