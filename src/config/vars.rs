//! `${VAR}` and `${VAR:-default}` in path values, expanded from the environment.

use super::Config;
use std::path::PathBuf;

impl Config {
    pub(super) fn expand_paths(&mut self, errors: &mut Vec<String>) {
        expand(&mut self.run.runs_dir, "run.runs_dir", errors);
        expand(&mut self.synth.root, "synth.root", errors);
        if let Some(p) = self.model.pretrained.as_mut() {
            expand(p, "model.pretrained", errors);
        }
        for (name, set) in [
            ("data.source", self.data.source.as_mut()),
            ("data.target", self.data.target.as_mut()),
            ("data.target_val", self.data.target_val.as_mut()),
        ] {
            if let Some(set) = set {
                expand(&mut set.root, &format!("{name}.root"), errors);
                if let Some(p) = set.labels_root.as_mut() {
                    expand(p, &format!("{name}.labels_root"), errors);
                }
            }
        }
    }
}

fn expand(path: &mut PathBuf, key: &str, errors: &mut Vec<String>) {
    let raw = path.to_string_lossy().into_owned();
    match shellexpand::env(&raw) {
        Ok(expanded) => *path = PathBuf::from(expanded.as_ref()),
        Err(e) => errors.push(format!(
            "{key} = {raw:?}: environment variable ${{{}}} is not set ({}); expected it set, \
             or a default as ${{{}:-default}}",
            e.var_name, e.cause, e.var_name
        )),
    }
}
