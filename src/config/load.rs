//! Reading a config: the file, `--set` overrides, then serde, `${VAR}` expansion and
//! validation, every problem collected so that a user sees all of them at once.

use super::Config;
use std::fmt;
use std::path::{Path, PathBuf};

/// Every problem found in a config file, one per line.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub errors: Vec<String>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}: {} error(s)", self.file.display(), self.errors.len())?;
        for e in &self.errors {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

impl Config {
    /// Reads, expands and validates a config file; returns every problem at once.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        Config::load_with_overrides(path, &[])
    }

    /// Like `load`, with `key=value` overrides (TOML values, dotted keys) applied first.
    pub fn load_with_overrides(path: &Path, overrides: &[String]) -> Result<Config, ConfigErrors> {
        let fail = |errors: Vec<String>| ConfigErrors { file: path.to_path_buf(), errors };
        let text = std::fs::read_to_string(path).map_err(|e| fail(vec![format!("cannot read the file: {e}")]))?;
        if overrides.is_empty() {
            // The file's own text, so that a parse error points at its own lines.
            return Config::from_toml_str(&text).map_err(fail);
        }
        let mut doc = parse(&text).map_err(fail)?;
        let errors: Vec<String> = overrides.iter().filter_map(|o| apply_override(&mut doc, o).err()).collect();
        if !errors.is_empty() {
            return Err(fail(errors));
        }
        Config::from_table(doc, None).map_err(fail)
    }

    pub fn from_toml_str(text: &str) -> Result<Config, Vec<String>> {
        Config::from_table(parse(text)?, Some(text))
    }

    /// serde, then the checks of `validate.rs` and `vars.rs`: a closed choice is checked on the
    /// TOML before serde reads it (serde would stop at the first), the rest on the typed config.
    /// serde reads `original` when it is the table's own text (its errors then point at the
    /// file's lines).
    fn from_table(mut doc: toml::Table, original: Option<&str>) -> Result<Config, Vec<String>> {
        let mut errors = Vec::new();
        super::validate::check_choices(&mut doc, &mut errors);
        let text = match original {
            Some(text) if errors.is_empty() => text.to_string(),
            _ => toml::to_string(&doc).expect("a table serialises"),
        };
        let mut unknown = Vec::new();
        let mut config: Config =
            serde_ignored::deserialize(toml::Deserializer::new(&text), |path| unknown.push(path.to_string()))
                .map_err(|e| [errors.clone(), vec![e.to_string().trim_end().to_string()]].concat())?;
        errors.extend(unknown.into_iter().map(|key| format!("{key}: unknown key")));
        config.expand_paths(&mut errors);
        config.validate(&mut errors);
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(errors)
        }
    }
}

fn parse(text: &str) -> Result<toml::Table, Vec<String>> {
    text.parse().map_err(|e: toml::de::Error| vec![e.to_string().trim_end().to_string()])
}

/// One `--set KEY=VALUE`: the value is TOML, or a bare word taken as a string.
fn apply_override(doc: &mut toml::Table, o: &str) -> Result<(), String> {
    let Some((key, value)) = o.split_once('=') else {
        return Err(format!("--set {o:?}: expected KEY=VALUE, e.g. active.budget=0.017"));
    };
    let value: toml::Value = match format!("v = {value}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap(),
        Err(_) => toml::Value::String(value.to_string()),
    };
    let parts: Vec<&str> = key.trim().split('.').collect();
    set_dotted(doc, &parts, value).map_err(|e| format!("--set {key}: {e}"))
}

/// Sets `parts` (a dotted key) in a TOML table, creating tables on the way.
fn set_dotted(table: &mut toml::Table, parts: &[&str], value: toml::Value) -> Result<(), String> {
    match parts {
        [] => Err("empty key".into()),
        [last] => {
            table.insert(last.to_string(), value);
            Ok(())
        }
        [first, rest @ ..] => {
            match table.entry(first.to_string()).or_insert_with(|| toml::Value::Table(Default::default())) {
                toml::Value::Table(inner) => set_dotted(inner, rest, value),
                _ => Err(format!("{first} is not a table")),
            }
        }
    }
}
