//! The checkpoint writer: a thread that puts captured checkpoints (ADA-MCU's, in the daemon) on
//! disk while the device thread trains on. At the paper's scale a checkpoint is about 1.1 GB (the ledger
//! snapshot of Cityscapes' 2,975 train images is 780 MB, the ResNet-101 with its momentum
//! 350 MB) and takes seconds to write and fsync; the trainer only pays for the copies.

use crate::train::checkpoint::{Checkpoint, Rotation};
use anyhow::{anyhow, Context, Result};
use crossbeam_channel::Sender;
use std::thread::JoinHandle;

pub struct CheckpointWriter<C: Checkpoint> {
    checkpoints: Option<Sender<C>>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl<C: Checkpoint> CheckpointWriter<C> {
    pub fn start(rotation: Rotation) -> Result<CheckpointWriter<C>> {
        // A rendezvous channel: the trainer hands a checkpoint over only when the writer is
        // free, so at most two captured checkpoints are held in memory at once.
        let (checkpoints, received) = crossbeam_channel::bounded::<C>(0);
        let thread = std::thread::Builder::new().name("checkpoint-writer".into()).spawn(move || {
            for checkpoint in received {
                let path = checkpoint
                    .write(&rotation)
                    .with_context(|| format!("writing the checkpoint of step {}", checkpoint.step()))?;
                tracing::debug!("wrote {}", path.display());
            }
            Ok(())
        })?;
        Ok(CheckpointWriter { checkpoints: Some(checkpoints), thread: Some(thread) })
    }

    /// Hands a checkpoint to the writer, waiting while it still writes the previous one. A
    /// write that failed since comes back here as the error (the writer stops at the first).
    pub fn submit(&mut self, checkpoint: C) -> Result<()> {
        let channel = self.checkpoints.as_ref().expect("the writer is open until finish");
        if channel.send(checkpoint).is_ok() {
            return Ok(());
        }
        self.join()?;
        Err(anyhow!("the checkpoint writer has stopped"))
    }

    /// Waits until every checkpoint handed over is written; its error if one failed.
    pub fn finish(mut self) -> Result<()> {
        self.join()
    }

    fn join(&mut self) -> Result<()> {
        // Closing the channel ends the writer's loop after the checkpoint in progress.
        self.checkpoints = None;
        match self.thread.take() {
            Some(thread) => thread.join().map_err(|_| anyhow!("the checkpoint writer panicked"))?,
            None => Ok(()),
        }
    }
}

impl<C: Checkpoint> Drop for CheckpointWriter<C> {
    /// When the trainer stops on an error, the checkpoint being written still completes.
    fn drop(&mut self) {
        if let Err(e) = self.join() {
            tracing::error!("{e:#}");
        }
    }
}
