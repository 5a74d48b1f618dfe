//! Replays every committed fuzz input (fuzz/corpus/<target>/*) through the function its fuzz
//! target feeds (callgate::fuzzing): none may panic. Inputs that once crashed a target stay
//! here as regression tests; the fuzzer itself (`cargo fuzz`, see fuzz/README.md) is not needed.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    out
}

#[test]
fn every_corpus_input_is_handled_without_a_panic() {
    for (target, run) in callgate::fuzzing::TARGETS {
        let inputs = corpus(target);
        assert!(
            inputs.iter().any(|(n, _)| n.starts_with("seed-")),
            "{target}: its seeds are missing (python3 fuzz/seeds.py)"
        );
        for (name, data) in &inputs {
            let result = std::panic::catch_unwind(|| run(data));
            assert!(result.is_ok(), "fuzz/corpus/{target}/{name} panics");
        }
    }
}

/// Every target has a fuzz target file, and every fuzz target a corpus.
#[test]
fn fuzz_targets_and_corpora_match() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files: Vec<String> = std::fs::read_dir(root.join("fuzz_targets"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().replace(".rs", ""))
        .collect();
    files.sort();
    let mut targets: Vec<String> = callgate::fuzzing::TARGETS
        .iter()
        .map(|(n, _)| (*n).to_owned())
        .collect();
    targets.sort();
    assert_eq!(files, targets);
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    for t in &targets {
        assert!(
            manifest.contains(&format!("name = \"{t}\"")),
            "{t} not in fuzz/Cargo.toml"
        );
    }
}

/// The seeds reach past the first check: the token seeds verify with the target's keys, so
/// the fuzzer starts from inputs that get to the XML and the account.
#[test]
fn token_seeds_are_real_tokens() {
    let now = UNIX_EPOCH + Duration::from_secs(callgate::fuzzing::TOKEN_NOW);
    let kr = callgate::fuzzing::keyring();
    for (name, want) in [
        ("seed-valid-crm", Ok(())),
        ("seed-valid-old", Ok(())),
        ("seed-old-second-key", Ok(())),
        ("seed-crm-children", Ok(())),
        ("seed-crm-too-long-lived", Err("invalid_field:expires")),
    ] {
        let token = corpus("token")
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| String::from_utf8(d).unwrap())
            .unwrap();
        let got = kr
            .verify(&token, now)
            .map(|_| ())
            .map_err(|e| e.code().into_owned());
        assert_eq!(got, want.map_err(str::to_owned), "{name}");
    }
}
