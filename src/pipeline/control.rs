//! The control plane, on a tokio runtime of its own: SIGTERM / SIGINT ask the training loop
//! to stop (it finishes the step, writes a checkpoint and exits 0); a second signal exits at
//! once. The Prometheus endpoint is started here too, and the process metrics are refreshed
//! on this runtime.

use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub struct Control {
    stop: Arc<AtomicBool>,
}

impl Control {
    pub fn start(metrics: Option<SocketAddr>) -> Result<Control> {
        if let Some(address) = metrics {
            crate::telemetry::install_exporter(address)?;
            tracing::info!("metrics on http://{address}/metrics");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new().name("control".into()).spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
            runtime.block_on(async move {
                use tokio::signal::unix::{signal, SignalKind};
                let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
                    (Ok(t), Ok(i)) => (t, i),
                    (Err(e), _) | (_, Err(e)) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                if metrics.is_some() {
                    tokio::spawn(crate::telemetry::report_process_metrics());
                }
                loop {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                    if flag.swap(true, Ordering::SeqCst) {
                        eprintln!("adamcu: second signal, exiting without a checkpoint");
                        std::process::exit(130);
                    }
                    tracing::info!("stop requested: finishing the step, then a checkpoint");
                }
            });
        })?;
        ready_rx.recv().context("control thread died")?.context("installing signal handlers")?;
        Ok(Control { stop })
    }

    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}
