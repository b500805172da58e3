//! `lazyblk report` on a small series pushed to a directory store: its
//! dedup figures agree with what each `push` said it uploaded, and it
//! writes its plots.

mod common;

use std::fs;
use std::path::PathBuf;

use common::{pseudo_random, run, World};

const CHUNK: usize = 512 * 1024;

/// An image file of the given chunks, each pseudo-random from its seed.
fn image(world: &World, name: &str, seeds: &[u64]) -> PathBuf {
    let bytes: Vec<u8> = seeds
        .iter()
        .flat_map(|&seed| pseudo_random(seed, CHUNK))
        .collect();
    let path = world.path(name);
    fs::write(&path, bytes).unwrap();
    path
}

fn start_line(variant: &str, origin: &str, done: f64, fetched: u64) -> String {
    serde_json::json!({
        "kind": "start", "workload": "handler", "image": "v1", "variant": variant,
        "origin": origin, "delay_ms": 0, "rate_bytes_per_sec": null,
        "ready_secs": done, "done_secs": done, "bytes_moved": fetched * CHUNK as u64,
        "chunks_fetched": fetched, "chunks_total": 8, "chunks_zero": 0, "load": "0.5"
    })
    .to_string()
}

#[test]
fn report_agrees_with_what_each_push_uploaded() {
    let world = World::new();
    let base = [1, 2, 3, 4, 5, 6, 7, 8];
    let images = [
        ("base", base.to_vec()),
        // The app: most of the base, two chunks of its own.
        ("v1", vec![1, 2, 3, 4, 5, 6, 10, 11]),
        // Rebuilt, nothing changed.
        ("v2", vec![1, 2, 3, 4, 5, 6, 10, 11]),
        // One chunk changed.
        ("v3", vec![1, 2, 3, 4, 5, 6, 10, 12]),
        ("other", vec![1, 20, 21, 22]),
    ];
    let mut uploaded = Vec::new();
    for (name, seeds) in &images {
        let path = image(&world, name, seeds);
        uploaded.push(world.push(&path, name)["chunks_uploaded"].as_u64().unwrap());
    }
    let results = world.path("results.jsonl");
    fs::write(
        &results,
        [
            start_line("baseline", "loopback registry", 3.0, 8),
            start_line("probe", "0 ms", 0.4, 2),
            start_line("cold", "0 ms", 0.3, 4),
            start_line("warm", "0 ms", 0.1, 0),
        ]
        .join("\n"),
    )
    .unwrap();
    let plots = world.path("plots");
    let report = |json: bool| {
        let mut cmd = world.lazyblk();
        cmd.args(["report", "--store"])
            .arg(world.store())
            .args(["--base", "base", "--series", "v1,v2,v3", "--other", "other"])
            .arg("--results")
            .arg(&results)
            .arg("--plots")
            .arg(&plots)
            .args(["--replay-starts", "50"]);
        if json {
            cmd.arg("--json");
        }
        run(&mut cmd).stdout
    };
    let value: serde_json::Value = serde_json::from_slice(&report(true)).unwrap();

    let new: Vec<u64> = value["dedup"]["pushes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["chunks_new"].as_u64().unwrap())
        .collect();
    assert_eq!(new, uploaded[1..4], "report against push --json");
    assert_eq!(new, [2, 0, 1]);
    let zero = value["dedup"]["zero_new_percent"].as_f64().unwrap();
    assert!((zero - 100.0 / 3.0).abs() < 1e-9, "{zero}");

    let reused: Vec<(String, u64)> = value["sharing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_owned(),
                s["reused"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected = [("v1", 6), ("v2", 6), ("v3", 6), ("other", 1)];
    assert_eq!(reused, expected.map(|(n, r)| (n.to_owned(), r)).to_vec());

    assert_eq!(value["sparsity"][0]["chunks_read"], 2);
    assert_eq!(value["sparsity"][0]["chunks_fetched_cold"], 4);
    let tiers = &value["tiers"];
    let reads = ["host", "fleet", "origin"].map(|t| tiers[t].as_u64().unwrap());
    assert!(reads.iter().sum::<u64>() > 0, "{tiers}");

    for plot in ["coldstart-handler.svg", "bytes-moved.svg", "sparsity.svg"] {
        let svg = fs::read_to_string(plots.join(plot)).unwrap();
        assert!(svg.starts_with("<svg"), "{plot}");
    }
    let table = String::from_utf8(report(false)).unwrap();
    assert!(
        table.contains("pushes uploading no new chunk 33%"),
        "{table}"
    );
}

#[test]
fn report_names_a_manifest_the_store_lacks() {
    let world = World::new();
    let path = image(&world, "base", &[1, 2]);
    world.push(&path, "base");
    let out = world
        .lazyblk()
        .args(["report", "--store"])
        .arg(world.store())
        .args(["--base", "base", "--series", "v9"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("\"v9\""), "{stderr}");
}
