#![no_main]

use bpf_kube_proxy::fuzzing::{Step, planner};

libfuzzer_sys::fuzz_target!(|steps: Vec<Step>| planner(&steps));
