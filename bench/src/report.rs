//! Results as JSON, one PNG per figure, and BENCHMARKS.md with the ratios and the targets.

use std::{fmt::Write as _, path::Path};

use plotters::prelude::*;

use crate::{
    Opts,
    figures::{Results, SOCKET_HOOKS},
};

const IMPLEMENTATIONS: [(&str, RGBColor); 6] = [
    ("ours", RGBColor(0x1f, 0x77, 0xb4)),
    // Ours with native XDP ahead of tc (the NodePort figures).
    ("xdp", RGBColor(0x17, 0xbe, 0xcf)),
    // The agent restarted over its pinned maps (the memory and ready figures).
    ("restart", RGBColor(0x94, 0x67, 0xbd)),
    ("iptables", RGBColor(0xd6, 0x27, 0x28)),
    ("nftables", RGBColor(0xff, 0x7f, 0x0e)),
    ("direct", RGBColor(0x2c, 0xa0, 0x2c)),
];

/// (figure, metric, title, y label, log scale)
const PLOTS: [(&str, &str, &str, &str, bool); 9] = [
    (
        "full_sync",
        "median",
        "Full sync of N Services x 10 endpoints",
        "ms",
        true,
    ),
    (
        "endpoint_change",
        "p99",
        "One endpoint change programmed (p99)",
        "ms",
        true,
    ),
    ("connect", "p50", "connect() to a ClusterIP (p50)", "us", false),
    (
        "connect",
        "rate",
        "connects per second, one client",
        "conn/s",
        false,
    ),
    (
        "memory",
        "agent_rss",
        "Agent RSS with N Services programmed",
        "MiB",
        false,
    ),
    (
        "memory",
        "map_memlock",
        "Kernel memory: our maps (24 GiB node, defaults), kube-proxy's rulesets",
        "MiB",
        false,
    ),
    (
        "ready",
        "after_start",
        "Agent start to every Service programmed (cold, and restarted over pinned maps)",
        "ms",
        true,
    ),
    (
        "nodeport",
        "requests_per_s",
        "NodePort requests per second from outside the node (higher is better)",
        "req/s",
        false,
    ),
    (
        "nodeport",
        "packets_per_s",
        "NodePort UDP packets per second delivered to the backend under a flood of 64-byte frames (higher is better)",
        "pps",
        false,
    ),
];

fn font() -> anyhow::Result<()> {
    // plotters draws text with ab_glyph from a TTF (Debian's fonts-dejavu-core).
    let bytes = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(bytes.into_boxed_slice()),
    )
    .map_err(|_| anyhow::anyhow!("DejaVuSans.ttf is not a usable font"))?;
    Ok(())
}

/// One implementation's line: its name, colour and (N, value) points.
type Series = (&'static str, RGBColor, Vec<(f64, f64)>);

fn plot(
    results: &Results,
    out: &Path,
    figure: &str,
    metric: &str,
    title: &str,
    unit: &str,
    log: bool,
) -> anyhow::Result<()> {
    let series: Vec<Series> = IMPLEMENTATIONS
        .iter()
        .map(|(name, color)| {
            let points = results
                .points
                .iter()
                .filter(|p| {
                    p.figure == figure
                        && p.metric == metric
                        && p.implementation == *name
                        && p.value.is_finite()
                })
                .map(|p| (p.n as f64, p.value))
                .collect();
            (*name, *color, points)
        })
        .filter(|(_, _, p): &Series| !p.is_empty())
        .collect();
    if series.is_empty() {
        return Ok(());
    }
    let xs = series.iter().flat_map(|s| s.2.iter().map(|p| p.0));
    let (xmin, xmax) = xs.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    let ys = series.iter().flat_map(|s| s.2.iter().map(|p| p.1));
    let (ymin, ymax) = ys.fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(y), b.max(y)));
    let path = out.join(format!("{figure}_{metric}.png"));
    let root = BitMapBackend::new(&path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let x_range = (xmin * 0.8)..(xmax * 1.25);
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70);
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc("Services (N)")
                .y_desc(unit)
                .draw()?;
            for (name, color, points) in &series {
                chart
                    .draw_series(LineSeries::new(points.clone(), color.stroke_width(3)))?
                    .label(*name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3)));
                chart.draw_series(points.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
            }
            chart
                .configure_series_labels()
                .border_style(BLACK)
                .background_style(WHITE.mix(0.9))
                .draw()?;
        }};
    }
    if log {
        draw!(builder.build_cartesian_2d(
            x_range.log_scale(),
            ((ymin * 0.5).max(1e-3)..ymax * 2.0).log_scale()
        )?);
    } else {
        draw!(builder.build_cartesian_2d(x_range.log_scale(), 0.0..ymax * 1.2)?);
    }
    root.present()?;
    Ok(())
}

fn cell(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.3}"),
        None => "n/a".into(),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "n/a".into(),
    }
}

/// Agent RSS and time to ready at N = `big`: a cold start and a restart must both meet them (a
/// restart adopts the pinned maps instead of writing them).
fn start_targets(r: &Results, big: usize) -> [Target; 2] {
    let both =
        |figure: &str, metric: &str| ["ours", "restart"].map(|start| r.get(figure, start, big, metric));
    let [cold, warm] = both("memory", "agent_rss");
    let [cold_ready, warm_ready] = both("ready", "after_start");
    [
        (
            format!(
                "agent RSS <= 48 MiB at {big} Services / {} endpoints, cold and after a restart",
                big * 10
            ),
            format!("cold {} MiB, restart {} MiB", cell(cold), cell(warm)),
            cold.zip(warm).map(|(c, w)| c <= 48.0 && w <= 48.0),
        ),
        (
            format!(
                "every Service programmed <= 1 s after the agent starts at N={big}, cold and after a restart"
            ),
            format!("cold {} ms, restart {} ms", cell(cold_ready), cell(warm_ready)),
            cold_ready
                .zip(warm_ready)
                .map(|(c, w)| c <= 1000.0 && w <= 1000.0),
        ),
    ]
}

/// The targets at N = 100 000 Services (1 M endpoints), in one row.
fn scale_target(r: &Results, scale: usize) -> Target {
    let sync = r.get("full_sync", "ours", scale, "median");
    let change = r.get("endpoint_change", "ours", scale, "p99");
    let [cold, warm] = ["ours", "restart"].map(|start| r.get("memory", start, scale, "agent_rss"));
    let [cold_ready, warm_ready] =
        ["ours", "restart"].map(|start| r.get("ready", start, scale, "after_start"));
    (
        format!("N={scale}: full sync <= 1.5 s, one endpoint change p99 <= 1 ms, agent RSS <= 400 MiB"),
        format!(
            "full sync {} ms; endpoint change p99 {} ms; RSS cold {} MiB, restart {} MiB; ready cold {} ms, restart {} ms",
            cell(sync),
            cell(change),
            cell(cold),
            cell(warm),
            cell(cold_ready),
            cell(warm_ready)
        ),
        match (sync, change, cold, warm) {
            (Some(sync), Some(change), Some(cold), Some(warm)) => {
                Some(sync <= 1500.0 && change <= 1.0 && cold <= 400.0 && warm <= 400.0)
            }
            _ => None,
        },
    )
}

/// One target: description, measured text, pass.
type Target = (String, String, Option<bool>);

/// Issue 16's memory target: the maps at default settings on a 24 GiB node, beside the kernel
/// memory of kube-proxy's rulesets for the same Services.
fn map_memory_target(opts: &Opts, r: &Results) -> Target {
    let maps: Vec<(usize, Option<f64>)> = opts
        .sizes
        .iter()
        .map(|n| (*n, r.get("memory", "ours", *n, "map_memlock")))
        .collect();
    let small_ok = maps
        .iter()
        .filter(|(n, _)| *n <= 1_000)
        .map(|(_, m)| m.map(|m| m <= 32.0))
        .collect::<Option<Vec<bool>>>()
        .map(|ok| ok.iter().all(|k| *k));
    // No faster than linearly: from each N to the next, the memory grows by at most N's ratio.
    #[expect(clippy::cast_precision_loss)]
    let linear = maps
        .windows(2)
        .map(|w| match (w[0], w[1]) {
            ((n0, Some(m0)), (n1, Some(m1))) => Some(m1 / m0 <= n1 as f64 / n0 as f64),
            _ => None,
        })
        .collect::<Option<Vec<bool>>>()
        .map(|ok| ok.iter().all(|k| *k));
    (
        "kernel map memory <= 32 MiB for N <= 1 000 at default settings on a 24 GiB node, growing no faster than linearly with N".into(),
        maps.iter()
            .map(|(n, m)| {
                format!(
                    "N={n}: {} MiB (iptables rules {} MiB, nftables {} MiB)",
                    cell(*m),
                    cell(r.get("memory", "iptables", *n, "map_memlock")),
                    cell(r.get("memory", "nftables", *n, "map_memlock"))
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
        small_ok.zip(linear).map(|(s, l)| s && l),
    )
}

/// What Maglev promises, from the table builder itself.
fn maglev_target(r: &Results) -> Target {
    let build = |size| r.get("maglev_build", "ours", 1000, size);
    let moved = r.get("maglev_move", "ours", 10, "others_max_pct");
    (
        "Maglev: removing 1 of 10 backends moves <= 12 % of the flows not on it (tables for 1 000 frontends x 100 backends built, time reported)".to_string(),
        format!(
            "at most {} % moved ({} % on average, {} % of all flows); build of 1 000 tables: {} ms at 16 381 entries, {} ms at 65 521, {} ms at 131 071",
            cell(moved),
            cell(r.get("maglev_move", "ours", 10, "others_mean_pct")),
            cell(r.get("maglev_move", "ours", 10, "overall_mean_pct")),
            cell(build("16381")),
            cell(build("65521")),
            cell(build("131071")),
        ),
        moved.map(|m| m <= 12.0),
    )
}

fn targets(opts: &Opts, r: &Results) -> Vec<Target> {
    // The 10 000-Service targets at the largest N up to it (1 000 in the quick run), the scale
    // targets at 100 000 when the run goes there.
    let big = crate::figures::nodeport_n(opts);
    let scale = opts.sizes.iter().copied().find(|n| *n >= 100_000);
    let small = opts.sizes[0];
    let mut out = Vec::new();
    let ours_p50 = r.get("connect", "ours", big, "p50");
    let direct_p50 = r.get("connect", "direct", big, "p50");
    let flat = r.get("connect", "ours", small, "p50");
    out.push((
        format!("connect() p50 at N={big} <= 1.05x direct, flat from N={small}"),
        format!(
            "{} of direct; N={small}: {} us, N={big}: {} us",
            ratio(ours_p50, direct_p50),
            cell(flat),
            cell(ours_p50)
        ),
        ours_p50
            .zip(direct_p50)
            .zip(flat)
            .map(|((o, d), f)| o <= 1.05 * d && o <= 1.10 * f),
    ));
    let sync = r.get("full_sync", "ours", big, "median");
    let ipt = r.get("full_sync", "iptables", big, "median");
    out.push((
        format!("full sync of {big} x 10 <= 120 ms and >= 20x faster than iptables-restore"),
        format!(
            "{} ms; iptables {} ms ({} faster)",
            cell(sync),
            cell(ipt),
            ratio(ipt, sync)
        ),
        sync.zip(ipt).map(|(s, i)| s <= 120.0 && i / s >= 20.0),
    ));
    let change = r.get("endpoint_change", "ours", big, "p99");
    out.push((
        format!("one endpoint change programmed p99 <= 2 ms at N={big}"),
        format!("{} ms", cell(change)),
        change.map(|c| c <= 2.0),
    ));
    // The pass runs on the agent's event loop: watch events wait behind it.
    let repair = r.get("repair_pass", "ours", big, "median");
    out.push((
        format!("periodic repair pass (all maps read back and compared) <= 50 ms at N={big}"),
        format!("{} ms", cell(repair)),
        repair.map(|c| c <= 50.0),
    ));
    let scrape = r.get("scrape", "ours", big, "median");
    let walk = r.get("map_walk", "ours", big, "median");
    let key_walk = r.get("map_walk", "key_walk", big, "conntrack_only");
    out.push((
        format!("a /metrics scrape's datapath readings <= 50 ms at N={big} with both conntrack tables full"),
        format!(
            "{} ms (the map walker's count of every map, on its own thread: {} ms; the key-by-key walk of the conntrack tables alone: {} ms, {} slower)",
            cell(scrape),
            cell(walk),
            cell(key_walk),
            ratio(key_walk, walk)
        ),
        scrape.map(|s| s <= 50.0),
    ));
    let quiet = r.get("endpoint_change_scrape", "ours", big, "p99");
    let busy = r.get("endpoint_change_scrape", "ours_while_walking", big, "p99");
    out.push((
        format!("an endpoint change does not wait behind map walks: p99 while the walker counts <= 2 ms at N={big}"),
        format!("{} ms while the walker counts back to back; {} ms quiet", cell(busy), cell(quiet)),
        busy.map(|b| b <= 2.0),
    ));
    // connect runs the frontend lookup and backend choice; the others one cheap lookup or two.
    for family in ["4", "6"] {
        let costs: Vec<(&str, Option<f64>, f64)> = SOCKET_HOOKS
            .iter()
            .filter(|h| h.ends_with(family))
            .map(|h| {
                let limit = if h.starts_with("connect") { 300.0 } else { 150.0 };
                (*h, r.get("prog_cost", "ours", big, h), limit)
            })
            .collect();
        out.push((
            format!(
                "IPv{family} socket hooks at N={big}: connect{family} <= 300 ns per run, the others <= 150 ns"
            ),
            costs
                .iter()
                .map(|(h, c, _)| format!("{h}: {} ns/run", cell(*c)))
                .collect::<Vec<_>>()
                .join(", "),
            costs
                .iter()
                .map(|(_, c, limit)| c.map(|c| c <= *limit))
                .collect::<Option<Vec<bool>>>()
                .map(|ok| ok.iter().all(|k| *k)),
        ));
    }
    out.push(map_memory_target(opts, r));
    out.extend(start_targets(r, big));
    if let Some(scale) = scale {
        out.push(scale_target(r, scale));
    }
    let np = |i: &str| r.get("nodeport", i, big, "requests_per_s");
    let (ours, ipt, direct) = (np("ours"), np("iptables"), np("direct"));
    out.push((
        format!("NodePort requests/s at N={big} >= 1.5x iptables DNAT, >= 0.9x direct"),
        format!(
            "ours {} req/s; {} of iptables ({} req/s), {} of direct ({} req/s)",
            cell(ours),
            ratio(ours, ipt),
            cell(ipt),
            ratio(ours, direct),
            cell(direct)
        ),
        match (ours, ipt, direct) {
            (Some(o), Some(i), Some(d)) => Some(o >= 1.5 * i && o >= 0.9 * d),
            _ => None,
        },
    ));
    out.extend(xdp_targets(r, big));
    out.push(maglev_target(r));
    out
}

/// Issue 17's XDP targets: NodePort requests/s at N against nftables and direct, and the
/// packet rate a UDP flood gets through against nftables.
fn xdp_targets(r: &Results, big: usize) -> [Target; 2] {
    let np = |i: &str| r.get("nodeport", i, big, "requests_per_s");
    let (xdp, nft, direct) = (np("xdp"), np("nftables"), np("direct"));
    let pps = |i: &str| r.get("nodeport", i, big, "packets_per_s");
    let (xdp_pps, nft_pps, tc_pps) = (pps("xdp"), pps("nftables"), pps("ours"));
    [
        (
            format!("NodePort requests/s with XDP at N={big} >= 1.5x nftables, >= 1.0x direct"),
            format!(
                "xdp {} req/s; {} of nftables ({} req/s), {} of direct ({} req/s)",
                cell(xdp),
                ratio(xdp, nft),
                cell(nft),
                ratio(xdp, direct),
                cell(direct)
            ),
            match (xdp, nft, direct) {
                (Some(x), Some(n), Some(d)) => Some(x >= 1.5 * n && x >= d),
                _ => None,
            },
        ),
        (
            format!("NodePort UDP packets/s with XDP at N={big} >= 2x nftables"),
            format!(
                "xdp {} pps; {} of nftables ({} pps); tc alone {} pps",
                cell(xdp_pps),
                ratio(xdp_pps, nft_pps),
                cell(nft_pps),
                cell(tc_pps)
            ),
            match (xdp_pps, nft_pps) {
                (Some(x), Some(n)) => Some(x >= 2.0 * n),
                _ => None,
            },
        ),
    ]
}

/// A figure's table: a column per implementation measured (or given up on) at some N, then
/// kube-proxy's rulesets as multiples of ours.
fn table(
    md: &mut String,
    opts: &Opts,
    results: &Results,
    (figure, metric, title, unit): (&str, &str, &str, &str),
) {
    let shown: Vec<&str> = IMPLEMENTATIONS
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| {
            opts.sizes.iter().any(|&n| {
                results.get(figure, name, n, metric).is_some()
                    || results.unfinished(figure, name, n).is_some()
            })
        })
        .collect();
    if shown.is_empty() {
        return;
    }
    let ratios: Vec<&str> = ["iptables", "nftables"]
        .into_iter()
        .filter(|name| shown.contains(name) && shown.contains(&"ours"))
        .collect();
    let _ = writeln!(md, "\n## {title} ({metric}, {unit})\n");
    let _ = writeln!(md, "![{title}](bench/results/{figure}_{metric}.png)\n");
    let headers = shown
        .iter()
        .map(ToString::to_string)
        .chain(ratios.iter().map(|r| format!("{r} / ours")));
    let headers: Vec<String> = headers.collect();
    let _ = writeln!(md, "| N | {} |", headers.join(" | "));
    let _ = writeln!(md, "|{}", " --- |".repeat(headers.len() + 1));
    for &n in &opts.sizes {
        let value = |name: &str| match results.unfinished(figure, name, n) {
            Some(limit) => format!("did not finish in {limit} s"),
            None => cell(results.get(figure, name, n, metric)),
        };
        let cells = shown.iter().map(|name| value(name)).chain(ratios.iter().map(|r| {
            ratio(
                results.get(figure, r, n, metric),
                results.get(figure, "ours", n, metric),
            )
        }));
        let _ = writeln!(md, "| {n} | {} |", cells.collect::<Vec<_>>().join(" | "));
    }
}

pub fn write(opts: &Opts, results: &Results) -> anyhow::Result<()> {
    std::fs::write(
        opts.out.join("results.json"),
        serde_json::to_string_pretty(results)?,
    )?;
    font()?;
    for (figure, metric, title, unit, log) in PLOTS {
        plot(results, &opts.out, figure, metric, title, unit, log)?;
    }
    let mut md = String::from("# Benchmarks\n\n");
    let _ = writeln!(
        md,
        "Written by `cargo xtask bench{}` ({}). Every row is measured side by side in one run on one \
         machine; compare the ratios, not the absolute figures, with other machines.\n",
        if opts.quick { " --quick" } else { "" },
        if opts.quick {
            "quick: small N, one repeat"
        } else {
            "full run"
        }
    );
    md.push_str("## Run\n\n");
    for note in &results.notes {
        let _ = writeln!(md, "- {note}");
    }
    md.push_str("\n## Targets\n\n| Target | Measured | Result |\n| --- | --- | --- |\n");
    for (what, measured, pass) in targets(opts, results) {
        let verdict = match pass {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "not measured",
        };
        println!("{verdict:<12} {what}: {measured}");
        let _ = writeln!(md, "| {what} | {measured} | {verdict} |");
    }
    for (figure, metric, title, unit, _) in PLOTS {
        table(&mut md, opts, results, (figure, metric, title, unit));
    }
    md.push_str(
        "\n## Per-invocation program cost\n\nSocket hooks: kernel.bpf_stats_enabled (run_time_ns / run_cnt) over the connect figure's runs \
         (TCP connects to the N ClusterIPs, each followed by getpeername(), then as many UDP datagrams sent with sendto() \
         to a UDP Service and answered through recvfrom(); then the same over IPv6, to N IPv6 ClusterIPs and an IPv6 UDP Service), \
         in ns/run. \
         tc ingress: BPF_PROG_TEST_RUN medians on synthetic SYNs (first packet of a NodePort flow; packet of a known flow; packet for no Service).\n\n\
         | N | connect4 | getpeer4 | sendmsg4 | recvmsg4 | connect6 | getpeer6 | sendmsg6 | recvmsg6 | tc new flow | tc known flow | tc no Service |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for &n in &opts.sizes {
        let v = |metric: &str| cell(results.get("prog_cost", "ours", n, metric));
        let hooks: Vec<String> = SOCKET_HOOKS.iter().map(|h| v(h)).collect();
        let _ = writeln!(
            md,
            "| {n} | {} | {} | {} | {} |",
            hooks.join(" | "),
            v("tc_new_flow"),
            v("tc_tracked"),
            v("tc_miss")
        );
    }
    std::fs::write(&opts.summary, md)?;
    println!("wrote {} and {}", opts.summary.display(), opts.out.display());
    Ok(())
}
