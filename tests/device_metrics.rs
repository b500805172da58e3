//! A FUSE device's Prometheus endpoint (`add --metrics`), scraped over real
//! HTTP after real reads.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;

use common::serve::http_get as get;
use common::*;

/// Reads 4 KiB at each of `offsets` of the device's disk.
fn read_4k_at(mnt: &std::path::Path, offsets: &[u64]) {
    let disk = File::open(mnt.join("disk")).unwrap();
    let mut buf = vec![0; 4096];
    for &at in offsets {
        disk.read_exact_at(&mut buf, at).unwrap();
    }
}

/// The value of the sample `series` (name and labels, exactly).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
        .parse()
        .unwrap()
}

#[test]
fn a_fuse_device_serves_its_counters_and_fetch_latencies() {
    let world = World::new();
    let image = world.path("image");
    std::fs::write(&image, pseudo_random(9, 8 << 20)).unwrap();
    world.push(&image, "app");

    let mnt = world.add_with(
        "app",
        "cache",
        "fuse",
        true,
        &["--metrics", "127.0.0.1:0", "--readahead-chunks", "0"],
    );
    let device = world.device(&mnt);
    let addr = device["metrics"]
        .as_str()
        .unwrap_or_else(|| panic!("no metrics address in {device}"))
        .to_owned();

    let (status, before) = get(&addr, "/metrics");
    assert!(status.contains("200"), "{status}");
    let label = "{name=\"app\"}";
    assert_eq!(
        sample(
            &before,
            &format!("lazyblk_device_chunks_fetched_total{label}")
        ),
        0.0
    );
    assert_eq!(
        sample(&before, &format!("lazyblk_device_chunks{label}")),
        16.0
    );

    // Three chunks read, one of them twice.
    read_4k_at(&mnt, &[0, 3 << 20, 5 << 20, 100]);

    let (_, after) = get(&addr, "/metrics");
    let fetched = sample(
        &after,
        &format!("lazyblk_device_chunks_fetched_total{label}"),
    );
    assert_eq!(fetched, 3.0, "{after}");
    assert!(
        sample(
            &after,
            &format!("lazyblk_device_read_requests_total{label}")
        ) >= 3.0
    );
    assert_eq!(
        sample(&after, &format!("lazyblk_device_chunks_present{label}")),
        3.0
    );
    assert!(sample(&after, &format!("lazyblk_device_cache_hits_total{label}")) >= 1.0);
    // Every fetch is in the histogram, and falls in some bucket.
    assert_eq!(
        sample(
            &after,
            &format!("lazyblk_device_fetch_seconds_count{label}")
        ),
        fetched
    );
    assert_eq!(
        sample(
            &after,
            "lazyblk_device_fetch_seconds_bucket{name=\"app\",le=\"+Inf\"}"
        ),
        fetched
    );
    assert!(sample(&after, &format!("lazyblk_device_fetch_seconds_sum{label}")) > 0.0);
    assert!(
        after.contains("# TYPE lazyblk_device_fetch_seconds histogram"),
        "{after}"
    );
    // A scrape changes no counter: the same figures again.
    let (_, again) = get(&addr, "/metrics");
    assert_eq!(
        sample(
            &again,
            &format!("lazyblk_device_chunks_fetched_total{label}")
        ),
        fetched
    );
    // Other paths are not metrics.
    assert!(get(&addr, "/").0.contains("404"));

    // The counters agree with `list`.
    let device = world.device(&mnt);
    assert_eq!(device["stats"]["chunks_fetched"], 3, "{device}");
    world.del(&mnt);
}

#[test]
fn a_tiered_device_serves_counters_per_tier() {
    let world = World::new();
    let image = world.path("image");
    std::fs::write(&image, pseudo_random(10, 4 << 20)).unwrap();
    world.push(&image, "app");
    // The origin (the last tier) has the image too, manifest included.
    let spare = world.path("spare");
    run(world
        .lazyblk()
        .args(["push", "--store"])
        .arg(&spare)
        .arg("--key")
        .arg(world.key())
        .arg(&image)
        .args(["--name", "app"]));
    let mnt = world.add_with(
        "app",
        "cache",
        "fuse",
        true,
        &[
            "--store",
            spare.to_str().unwrap(),
            "--metrics",
            "127.0.0.1:0",
            "--readahead-chunks",
            "0",
        ],
    );
    let addr = world.device(&mnt)["metrics"].as_str().unwrap().to_owned();
    // Chunks 0 and 4.
    read_4k_at(&mnt, &[0, 2 << 20]);
    let (_, text) = get(&addr, "/metrics");
    let tier = |t: &std::path::Path| format!("{{name=\"app\",tier=\"{}\"}}", t.display());
    // The first tier answers both reads; the origin is never asked.
    assert_eq!(
        sample(
            &text,
            &format!("lazyblk_device_tier_hits_total{}", tier(&world.store()))
        ),
        2.0
    );
    assert_eq!(
        sample(
            &text,
            &format!("lazyblk_device_tier_hits_total{}", tier(&spare))
        ),
        0.0
    );
    world.del(&mnt);
}

#[test]
fn a_device_with_a_cache_fleet_serves_the_fleets_counters() {
    let world = World::new();
    let image = world.path("image");
    std::fs::write(&image, pseudo_random(12, 4 << 20)).unwrap();
    world.push(&image, "app");
    let token = world.path("token");
    std::fs::write(&token, "fleet-token").unwrap();
    let nodes: Vec<serve::Served> = (0..5)
        .map(|i| {
            serve::Served::start([
                "--store".as_ref(),
                world.path(&format!("node{i}")).as_os_str(),
                "--write-token-file".as_ref(),
                token.as_os_str(),
                "--shard-cache-size".as_ref(),
                "64M".as_ref(),
            ])
        })
        .collect();
    let urls: Vec<&str> = nodes.iter().map(|n| n.url.as_str()).collect();
    let mnt = world.add_with(
        "app",
        "cache",
        "fuse",
        true,
        &[
            "--ec-cache",
            &urls.join(","),
            "--token-file",
            token.to_str().unwrap(),
            "--metrics",
            "127.0.0.1:0",
            "--readahead-chunks",
            "0",
        ],
    );
    let addr = world.device(&mnt)["metrics"].as_str().unwrap().to_owned();
    // Chunks 0 and 4.
    read_4k_at(&mnt, &[0, 2 << 20]);
    let fleet = |text: &str, counter: &str| {
        sample(
            text,
            &format!("lazyblk_device_fleet_{counter}_total{{name=\"app\"}}"),
        )
    };
    // Both reads asked the cold fleet, missed, and were filled from the
    // origin: five shards each (4+1), written in the background.
    let mut text = String::new();
    for _ in 0..100 {
        text = get(&addr, "/metrics").1;
        if fleet(&text, "shards_written") >= 10.0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(fleet(&text, "reads"), 2.0, "{text}");
    assert_eq!(fleet(&text, "misses"), 2.0, "{text}");
    assert_eq!(fleet(&text, "hits"), 0.0, "{text}");
    assert_eq!(fleet(&text, "shards_written"), 10.0, "{text}");
    assert_eq!(fleet(&text, "integrity_failures"), 0.0, "{text}");
    world.del(&mnt);
}
