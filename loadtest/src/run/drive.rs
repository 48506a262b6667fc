//! Process orchestration: listening for workers, spawning the local ones, handing out
//! their shares of the peers, starting, sampling, churning and stopping them.

use super::admission::{ADMISSION_CLOSE, MachineBusy};
use super::config::{Net, RunConfig};
use super::merge::merge;
use super::progress::progress_line;
use super::report::RunReport;
use super::rss::{RSS_EVERY, RssSampler, RssSource};
use super::series::{Reduce, Series};
use super::stack::{Stack, exe};
use crate::error::HarnessError;
use crate::worker::{
    ADDRESS_BLOCK, FromWorker, Hello, ProcStats, ToWorker, WorkerFinal, WorkerSample,
};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::io::BufReader;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio::time::Instant;

pub(super) struct WorkerLink {
    pub(super) writer: OwnedWriteHalf,
    pub(super) pid: u32,
    pub(super) host: String,
    pub(super) peers: usize,
    pub(super) latest: Option<WorkerSample>,
    pub(super) fin: Option<WorkerFinal>,
    pub(super) gone: bool,
}

pub(super) enum Event {
    Msg(usize, Box<FromWorker>),
    Gone(usize),
}

pub(super) async fn tell(w: &mut WorkerLink, msg: &ToWorker) -> bool {
    let Ok(mut line) = serde_json::to_vec(msg) else {
        return false;
    };
    line.push(b'\n');
    w.writer.write_all(&line).await.is_ok()
}

/// Points of the machine-busy series (one a second: over an hour before pairs merge).
const BUSY_POINTS: usize = 4096;

/// The RSS sampler of this run's processes: this one, the data plane, every worker
/// (read from `/proc` when on this machine, from its own reports otherwise).
fn rss_sampler(stack: &Stack, links: &[WorkerLink]) -> RssSampler {
    let mut rss = RssSampler::new(RSS_EVERY);
    rss.track("coordinator".into(), std::process::id(), RssSource::Local);
    if let Some(pid) = stack.dataplane_pid() {
        rss.track("dataplane".into(), pid, RssSource::Local);
    }
    let here = crate::worker::hostname();
    for (w, l) in links.iter().enumerate() {
        let source = if l.host.is_empty() || l.host == here {
            RssSource::Local
        } else {
            RssSource::Worker(w)
        };
        rss.track(format!("worker-{w}"), l.pid, source);
    }
    rss
}

pub(super) fn share(peers: usize, workers: usize, w: usize) -> usize {
    peers / workers + usize::from(w < peers % workers)
}

pub(super) async fn drive(
    cfg: &RunConfig,
    stack: &Stack,
    listener: TcpListener,
    coord_addr: SocketAddr,
    workers: usize,
) -> Result<RunReport, HarnessError> {
    // Spawn the local workers.
    let local = workers - cfg.remote_workers;
    let exe = exe(cfg)?;
    let mut children: Vec<Child> = Vec::new();
    let connect_to = if coord_addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], coord_addr.port()))
    } else {
        coord_addr
    };
    for _ in 0..local {
        match Command::new(&exe)
            .args(["worker", "--coordinator", &connect_to.to_string()])
            .args(match cfg.net {
                Net::Sim => &["--net", "sim"][..],
                Net::Sockets => &[][..],
            })
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
        {
            Ok(c) => children.push(c),
            Err(e) => {
                kill_all(children).await;
                return Err(HarnessError::Start(format!("worker process: {e}")));
            }
        }
    }
    if cfg.remote_workers > 0 {
        eprintln!(
            "waiting for {} remote workers: starling-loadtest worker --coordinator {}",
            cfg.remote_workers, coord_addr
        );
    }
    // Accept them all.
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let mut links: Vec<WorkerLink> = Vec::new();
    let accept_for = if cfg.remote_workers > 0 {
        Duration::from_secs(600)
    } else {
        Duration::from_secs(60)
    };
    let accept_deadline = Instant::now() + accept_for;
    while links.len() < workers {
        let accepted = tokio::time::timeout_at(accept_deadline, listener.accept()).await;
        let Ok(Ok((stream, _))) = accepted else {
            kill_all(children).await;
            return Err(HarnessError::Start(format!(
                "only {} of {workers} workers connected",
                links.len()
            )));
        };
        let _ = stream.set_nodelay(true);
        let (rd, writer) = stream.into_split();
        let mut lines = BufReader::new(rd).lines();
        let ready = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await;
        let Ok(Ok(Some(line))) = ready else { continue };
        let Ok(FromWorker::Ready { pid, host }) = serde_json::from_str(&line) else {
            continue;
        };
        let id = links.len();
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<FromWorker>(&line) {
                    Ok(m) => {
                        if tx.send(Event::Msg(id, Box::new(m))).is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!(worker = id, "bad message: {e}"),
                }
            }
            let _ = tx.send(Event::Gone(id));
        });
        links.push(WorkerLink {
            writer,
            pid,
            host,
            peers: share(cfg.peers, workers, id),
            latest: None,
            fin: None,
            gone: false,
        });
    }
    drop(tx);
    let mut report_errors: Vec<String> = Vec::new();
    for (w, link) in links.iter_mut().enumerate() {
        let hello = Hello {
            worker: w,
            control_url: stack.control_url.clone(),
            ca_pem: crate::tls::hello_fields(&stack.transport).0,
            insecure_plaintext: crate::tls::hello_fields(&stack.transport).1,
            broadcast_id: stack.broadcast_id.clone(),
            stream_kbps: stack.stream_kbps.unwrap_or(cfg.bitrate_kbps),
            pattern_seed: stack.pattern_seed,
            peers: link.peers,
            index_offset: w * ADDRESS_BLOCK,
            upload_profile: cfg.upload.multiples.clone(),
            join_rate: cfg.join_rate * link.peers as f64 / cfg.peers as f64,
            target_lag_ms: cfg.target_lag.map(|d| d.as_millis() as u64),
            sample_ms: 1000,
            shared_signature_cache: cfg.shared_signature_cache,
            chunk_ms: Some(cfg.chunk_ms),
            substreams: Some(cfg.substreams),
            sim: Some(cfg.sim),
        };
        if !tell(link, &ToWorker::Hello(hello)).await {
            report_errors.push(format!("worker {w}: hello not delivered"));
        }
    }
    let egress0 = stack.egress().await;
    let t0 = Instant::now();
    for link in links.iter_mut() {
        let _ = tell(link, &ToWorker::Start).await;
    }

    // Progress, ramp, steady phase, churn.
    let tty = std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ramp_limit: Instant =
        t0 + Duration::from_secs_f64(if cfg.join_rate > 0.0 {
            cfg.peers as f64 / cfg.join_rate
        } else {
            0.0
        }) + Duration::from_secs(120);
    let mut busy = MachineBusy::new();
    let mut busy_series = Series::new(BUSY_POINTS, Reduce::Mean);
    let mut rss = rss_sampler(stack, &links);
    let latest_rss = |links: &[WorkerLink], w: usize| {
        links
            .get(w)
            .and_then(|l| l.latest.as_ref())
            .map(|s| s.process.rss_bytes)
    };
    let mut held_since: Option<Instant> = None;
    // What the workers were last told (a closed ramp stays held: no resume is sent).
    let mut holding = false;
    let mut ramp_held = Duration::ZERO;
    let mut admission_closed_at: Option<usize> = None;
    let mut steady_from: Option<Instant> = None;
    let mut churn_due = 0.0;
    // The progress line's current server rate.
    let mut recent = crate::report::RecentRate::default();
    let mut churn_rr = 0usize;
    let mut churn_sent = 0usize;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut ctrl_c => {
                report_errors.push("interrupted (Ctrl-C)".into());
                break;
            }
            ev = rx.recv() => {
                match ev {
                    Some(Event::Msg(w, m)) => match *m {
                        FromWorker::Sample(s) => links[w].latest = Some(s),
                        FromWorker::Final(f) => links[w].fin = Some(f),
                        FromWorker::Ready { .. } => {}
                    },
                    Some(Event::Gone(w)) if !links[w].gone => {
                        links[w].gone = true;
                        report_errors.push(format!(
                            "worker {w} (pid {}) disconnected during the run",
                            links[w].pid
                        ));
                    }
                    Some(Event::Gone(_)) | None => {}
                }
                if links.iter().all(|l| l.gone) {
                    break;
                }
                continue;
            }
        }
        let now = Instant::now();
        let samples: Vec<WorkerSample> = links.iter().filter_map(|l| l.latest.clone()).collect();
        let total: usize = samples.iter().map(|s| s.peers_total).sum();
        let joining: usize = samples.iter().map(|s| s.joining).sum();
        let load = busy.sample();
        let t_s = (now - t0).as_secs_f64();
        if let Some(b) = load {
            busy_series.push(t_s, b);
        }
        if rss.due(t_s) {
            rss.sample(t_s, steady_from.is_some(), |w| latest_rss(&links, w));
        }
        if steady_from.is_none() && cfg.max_busy > 0.0 {
            match (held_since, load) {
                (None, Some(b)) if b >= cfg.max_busy => held_since = Some(now),
                (Some(since), Some(b)) if b < cfg.max_busy - 0.15 => {
                    held_since = None;
                    ramp_held += now - since;
                }
                _ => {}
            }
            let hold = held_since.is_some();
            if hold != holding {
                holding = hold;
                for link in links.iter_mut().filter(|l| !l.gone) {
                    let _ = tell(link, &ToWorker::Hold { hold }).await;
                }
            }
            if let Some(since) = held_since {
                // A held ramp is not a slow deployment: the deadline moves with it.
                ramp_limit += Duration::from_secs(1);
                if now - since >= ADMISSION_CLOSE {
                    let active: usize = samples.iter().map(|s| s.active).sum();
                    admission_closed_at = Some(active);
                    ramp_held += now - since;
                    held_since = None;
                    steady_from = Some(now);
                }
            }
        }
        if steady_from.is_none() {
            let all_reported = samples.len() == links.iter().filter(|l| !l.gone).count();
            if (all_reported && total >= cfg.peers && joining == 0) || now >= ramp_limit {
                if now >= ramp_limit {
                    report_errors.push(format!(
                        "join ramp did not complete in time ({total} added, {joining} still joining)"
                    ));
                }
                steady_from = Some(now);
            }
        }
        if let Some(s) = steady_from {
            if now >= s + cfg.duration {
                break;
            }
            churn_due += cfg.churn_per_min / 60.0;
            let n = churn_due.floor() as usize;
            churn_due -= n as f64;
            let alive: Vec<usize> = (0..links.len()).filter(|w| !links[*w].gone).collect();
            if !alive.is_empty() {
                let mut per = vec![0usize; links.len()];
                for _ in 0..n {
                    per[alive[churn_rr % alive.len()]] += 1;
                    churn_rr += 1;
                }
                for (w, count) in per.into_iter().enumerate() {
                    if count > 0 && tell(&mut links[w], &ToWorker::Churn { count }).await {
                        churn_sent += count;
                    }
                }
            }
        }
        if cfg.progress {
            let egress = stack.egress().await;
            let egress_b = egress.zip(egress0).map(|(a, b)| a.saturating_sub(b));
            let line = progress_line(
                now - t0,
                cfg,
                stack.stream_kbps.unwrap_or(cfg.bitrate_kbps),
                &samples,
                egress_b,
                &mut recent,
            );
            if tty {
                eprint!("\r{line}   ");
            } else {
                eprintln!("{line}");
            }
        }
    }
    if cfg.progress && tty {
        eprintln!();
    }
    // Stop: egress and the end of the window first, then the workers' finals.
    let egress1 = stack.egress().await;
    let end = Instant::now();
    rss.sample((end - t0).as_secs_f64(), steady_from.is_some(), |w| {
        latest_rss(&links, w)
    });
    let dp_proc = stack.dataplane_pid().map(ProcStats::of_pid);
    for link in links.iter_mut() {
        if !link.gone {
            let _ = tell(link, &ToWorker::Stop).await;
        }
    }
    let fin_deadline = Instant::now() + Duration::from_secs(60);
    while links.iter().any(|l| l.fin.is_none() && !l.gone) {
        match tokio::time::timeout_at(fin_deadline, rx.recv()).await {
            Ok(Some(Event::Msg(w, m))) => match *m {
                FromWorker::Final(f) => links[w].fin = Some(f),
                FromWorker::Sample(s) => links[w].latest = Some(s),
                FromWorker::Ready { .. } => {}
            },
            Ok(Some(Event::Gone(w))) => links[w].gone = true,
            Ok(None) | Err(_) => break,
        }
    }
    let grid = stack.grid().await;
    // Let the workers make their peers leave and exit; then make sure they are gone.
    let wait_children = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(45);
        for mut c in children {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
    });
    let _ = wait_children.await;

    let coordinator = ProcStats::current();
    let mut r = merge(
        cfg,
        stack.stream_kbps.unwrap_or(cfg.bitrate_kbps),
        workers,
        &links,
        (end - t0).as_secs_f64(),
        steady_from.map_or(0.0, |s| (s - t0).as_secs_f64()),
        egress0.zip(egress1).map(|(a, b)| b.saturating_sub(a)),
        coordinator,
        dp_proc,
        busy_series,
    );
    r.rss = rss.figures();
    r.grid = grid;
    r.ramp_held_s = ramp_held.as_secs_f64();
    r.admission_closed_at_peers = admission_closed_at;
    // The machine, not the grid, capped the audience.
    r.machine_bound |= admission_closed_at.is_some();
    for e in report_errors {
        r.error(e);
    }
    if churn_sent > 0 {
        tracing::info!(churn_sent, "churn commands sent");
    }
    Ok(r)
}

pub(super) async fn kill_all(children: Vec<Child>) {
    let _ = tokio::task::spawn_blocking(move || {
        for mut c in children {
            let _ = c.kill();
            let _ = c.wait();
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares() {
        let s: Vec<usize> = (0..3).map(|w| share(10, 3, w)).collect();
        assert_eq!(s, vec![4, 3, 3]);
    }
}
