//! Confusion counts of labels against predictions, on the device: the evaluation's confusion
//! matrix and the DCCM's error rates (Eq. 7) both count with it.

use crate::data::labels::IGNORE;
use tch::{Kind, Tensor};

/// Label x prediction counts [C, C] (i64, on the inputs' device) over the pixels whose label
/// is a training id (255 and anything past C are skipped). Shared by the evaluation and the
/// DCCM's error rates (Eq. 7).
pub fn confusion_counts(labels: &Tensor, predictions: &Tensor, classes: i64) -> Tensor {
    let labels = labels.to_device(predictions.device()).to_kind(Kind::Int64).flatten(0, -1);
    let predictions = predictions.to_kind(Kind::Int64).flatten(0, -1);
    let valid = labels.ne(IGNORE as i64).logical_and(&labels.lt(classes));
    // Skipped pixels count in an extra bin that is dropped: fixed shapes, so on CUDA the
    // DCCM update inside a training step never waits (masked_select and bincount would).
    let index = (labels * classes + predictions).where_scalarother(&valid, classes * classes);
    Tensor::zeros([classes * classes + 1], (Kind::Int64, index.device()))
        .scatter_add(0, &index, &index.ones_like())
        .narrow(0, 0, classes * classes)
        .view([classes, classes])
}
