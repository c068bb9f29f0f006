//! `list`: the Services the pinned maps hold, read back from the maps alone.

use std::{fmt::Write as _, path::Path};

use bpf_kube_proxy::{
    datapath::{
        maps::PinnedMaps,
        reader::{BackendView, Snapshot},
        readings,
    },
    telemetry::metrics::MapFill,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

fn backend_text(b: &BackendView) -> String {
    let mut text = match b.addr {
        Some(key) => match key.addr {
            std::net::IpAddr::V4(a) => format!("{a}:{}", key.port),
            std::net::IpAddr::V6(a) => format!("[{a}]:{}", key.port),
        },
        None => format!("<missing backend {}>", b.id),
    };
    if b.terminating {
        text.push_str(" (terminating)");
    }
    if b.local {
        text.push_str(" (local)");
    }
    text
}

/// Renders the snapshot as an aligned table, one row per frontend.
pub fn table(snapshot: &Snapshot) -> String {
    let rows: Vec<[String; 4]> = snapshot
        .frontends
        .iter()
        .map(|f| {
            let mut backends = if f.backends.is_empty() {
                "(none: rejected)".to_string()
            } else {
                f.backends.iter().map(backend_text).collect::<Vec<_>>().join(", ")
            };
            if !f.missing_slots.is_empty() {
                let _ = write!(backends, " [missing slots {:?}]", f.missing_slots);
            }
            let service = if f.service.is_empty() {
                "?".to_string()
            } else {
                f.service.clone()
            };
            let port = if f.port_name.is_empty() {
                "-".to_string()
            } else {
                f.port_name.clone()
            };
            [service, port, f.frontend.to_string(), backends]
        })
        .collect();
    let header = ["SERVICE", "PORT", "FRONTEND", "BACKENDS"].map(str::to_string);
    let mut out = aligned(&header, &rows);
    let backends: usize = snapshot.frontends.iter().map(|f| f.backends.len()).sum();
    let _ = writeln!(
        out,
        "{} frontends, {backends} backend slots",
        snapshot.frontends.len()
    );
    if !snapshot.orphan_backends.is_empty() {
        let _ = writeln!(
            out,
            "{} backends not referenced by any frontend",
            snapshot.orphan_backends.len()
        );
    }
    out
}

/// Rows under `header`, each column as wide as its widest cell but the last, which is not
/// padded.
fn aligned<const N: usize>(header: &[String; N], rows: &[[String; N]]) -> String {
    let mut widths = header.clone().map(|h| h.len());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(header).chain(rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (cell, w))| {
                if i + 1 == N {
                    cell.clone()
                } else {
                    format!("{cell:<w$}")
                }
            })
            .collect();
        let _ = writeln!(out, "{}", line.join("  "));
    }
    out
}

/// Renders each map's fill and kernel memory, with the total.
pub fn maps_table(usage: &[MapFill]) -> String {
    let mib = |bytes: u64| {
        if bytes < 1024 * 1024 {
            format!("{} KiB", bytes.div_ceil(1024))
        } else {
            format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
        }
    };
    let rows: Vec<[String; 4]> = usage
        .iter()
        .map(|m| {
            [
                m.map.to_string(),
                m.entries.to_string(),
                m.capacity.to_string(),
                m.memory.map_or_else(|| "?".to_string(), mib),
            ]
        })
        .collect();
    let header = ["MAP", "ENTRIES", "CAPACITY", "MEMORY"].map(str::to_string);
    let mut out = aligned(&header, &rows);
    let total: u64 = usage.iter().filter_map(|m| m.memory).sum();
    let _ = writeln!(out, "{} maps, {} of kernel memory", usage.len(), mib(total));
    out
}

/// `list`, or with `maps` every pinned map's entries, capacity and kernel memory.
pub fn run(pin_dir: &Path, format: Format, maps: bool) -> anyhow::Result<()> {
    if maps {
        let usage = readings::usage(pin_dir);
        if usage.is_empty() {
            anyhow::bail!("no pinned maps under {}", pin_dir.display());
        }
        match format {
            Format::Table => print!("{}", maps_table(&usage)),
            Format::Json => println!("{}", serde_json::to_string_pretty(&usage)?),
        }
        return Ok(());
    }
    let maps = PinnedMaps::open(pin_dir)?;
    let snapshot = Snapshot::read(&maps)?;
    match format {
        Format::Table => print!("{}", table(&snapshot)),
        Format::Json => println!("{}", serde_json::to_string_pretty(&snapshot)?),
    }
    Ok(())
}
