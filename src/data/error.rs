//! Data errors: each names the file and what was wrong with it.

use std::path::PathBuf;

/// What kind of problem a sample had; also the `kind` label of `adamcu_loader_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataErrorKind {
    Unreadable,
    Corrupt,
    SizeMismatch,
    LabelOutOfMap,
    MissingCounterpart,
    Empty,
    Layout,
}

impl DataErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DataErrorKind::Unreadable => "unreadable",
            DataErrorKind::Corrupt => "corrupt",
            DataErrorKind::SizeMismatch => "size_mismatch",
            DataErrorKind::LabelOutOfMap => "label_out_of_map",
            DataErrorKind::MissingCounterpart => "missing_counterpart",
            DataErrorKind::Empty => "empty",
            DataErrorKind::Layout => "layout",
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct DataError {
    pub kind: DataErrorKind,
    pub path: PathBuf,
    pub reason: String,
}

impl DataError {
    pub fn new(kind: DataErrorKind, path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        DataError { kind, path: path.into(), reason: reason.into() }
    }
}
