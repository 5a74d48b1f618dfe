//! Call recording: the bridge's tap hands over both directions' decoded G.711 audio; the
//! recorder lays them side by side on a wall clock (agent left, far end right) into a stereo
//! 8 kHz 16-bit WAV file, written incrementally: the header's sizes are brought up to date
//! every second, so a crash keeps what was recorded.

use std::collections::VecDeque;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;

/// Which side a chunk of audio is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The agent (browser → SIP): the left channel.
    Agent,
    /// The far end (SIP → browser): the right channel.
    Far,
}

/// The bridge's end of a recording: decoded samples of either side.
pub type Tap = mpsc::Sender<(Side, Vec<i16>)>;

/// One 20 ms frame at 8 kHz.
const FRAME: usize = 160;
/// More than this much queued audio of one side (it runs ahead of the clock) is dropped.
const MAX_BACKLOG: usize = FRAME * 20;
/// Header sizes are refreshed this often (frames).
const SYNC_EVERY: usize = 50;

/// The 44-byte header of a PCM WAV file with `data_len` bytes of stereo 8 kHz 16-bit audio.
pub fn wav_header(data_len: u32) -> [u8; 44] {
    let mut h = [0u8; 44];
    let mut put = |at: usize, b: &[u8]| h[at..at + b.len()].copy_from_slice(b);
    put(0, b"RIFF");
    put(4, &data_len.saturating_add(36).to_le_bytes());
    put(8, b"WAVEfmt ");
    put(16, &16u32.to_le_bytes());
    put(20, &1u16.to_le_bytes()); // PCM
    put(22, &2u16.to_le_bytes()); // stereo
    put(24, &8000u32.to_le_bytes());
    put(28, &(8000u32 * 4).to_le_bytes()); // byte rate
    put(32, &4u16.to_le_bytes()); // block align
    put(34, &16u16.to_le_bytes()); // bits per sample
    put(36, b"data");
    put(40, &data_len.to_le_bytes());
    h
}

/// Lays both sides' samples on the clock: one stereo frame per tick, silence where a side
/// sent nothing.
#[derive(Debug, Default)]
pub struct Mixer {
    agent: VecDeque<i16>,
    far: VecDeque<i16>,
}

impl Mixer {
    /// Queues samples of one side.
    pub fn push(&mut self, side: Side, samples: &[i16]) {
        let q = match side {
            Side::Agent => &mut self.agent,
            Side::Far => &mut self.far,
        };
        q.extend(samples);
        while q.len() > MAX_BACKLOG {
            q.pop_front();
        }
    }

    /// The next 20 ms as interleaved little-endian stereo bytes.
    pub fn frame(&mut self, out: &mut Vec<u8>) {
        for _ in 0..FRAME {
            let l = self.agent.pop_front().unwrap_or(0);
            let r = self.far.pop_front().unwrap_or(0);
            out.extend_from_slice(&l.to_le_bytes());
            out.extend_from_slice(&r.to_le_bytes());
        }
    }
}

/// The recording's file name for call `call_id` (`c-` and hex digits only, so safe as a
/// path component).
pub fn file_name(call_id: &str) -> Option<String> {
    let ok = call_id.starts_with("c-")
        && call_id.len() <= 64
        && call_id[2..].bytes().all(|b| b.is_ascii_hexdigit());
    ok.then(|| format!("{call_id}.wav"))
}

/// Starts recording into `path` (created with mode 0600 where supported). Returns the tap for
/// the bridge; the recording ends (header final) when every tap is dropped. `hold` is kept
/// until then (shutdown waits for recordings through it).
pub fn start<H: Send + 'static>(path: PathBuf, hold: H) -> std::io::Result<Tap> {
    let mut file = {
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
        o.open(&path)?
    };
    file.write_all(&wav_header(0))?;
    let (tap, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        run(rx, file, path).await;
        drop(hold);
    });
    Ok(tap)
}

async fn run(mut rx: mpsc::Receiver<(Side, Vec<i16>)>, file: std::fs::File, path: PathBuf) {
    let mut mixer = Mixer::default();
    let mut clock = tokio::time::interval(Duration::from_millis(20));
    clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut pending = Vec::with_capacity(FRAME * 4 * SYNC_EVERY);
    let mut frames = 0usize;
    let mut written: u32 = 0;
    let mut file = Some(file);
    let mut open = true;
    while open {
        tokio::select! {
            chunk = rx.recv() => match chunk {
                Some((side, samples)) => mixer.push(side, &samples),
                None => open = false,
            },
            _ = clock.tick() => {
                mixer.frame(&mut pending);
                frames += 1;
            }
        }
        if frames >= SYNC_EVERY || !open {
            frames = 0;
            let data = std::mem::take(&mut pending);
            let Some(f) = file.take() else { break };
            let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
            let total = written.saturating_add(len);
            let done = tokio::task::spawn_blocking(move || append(f, &data, total)).await;
            match done {
                Ok(Ok(f)) => {
                    written = total;
                    file = Some(f);
                }
                Ok(Err(e)) => {
                    tracing::warn!(file = %path.display(), "recording stopped: {e}");
                    return;
                }
                Err(_) => return,
            }
        }
    }
    tracing::debug!(file = %path.display(), bytes = written, "recording finished");
}

/// Appends `data` and rewrites the header for `total` data bytes.
fn append(mut f: std::fs::File, data: &[u8], total: u32) -> std::io::Result<std::fs::File> {
    f.seek(SeekFrom::End(0))?;
    f.write_all(data)?;
    f.seek(SeekFrom::Start(0))?;
    f.write_all(&wav_header(total))?;
    f.sync_data()?;
    Ok(f)
}

/// Deletes recordings in `dir` older than `max_age`; returns how many went.
pub fn sweep(dir: &Path, max_age: Duration) -> usize {
    let mut gone = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > max_age);
        if old
            && path.extension().is_some_and(|e| e == "wav")
            && std::fs::remove_file(&path).is_ok()
        {
            gone += 1;
        }
    }
    gone
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_interleave_both_sides_with_silence_for_the_missing_one() {
        let mut m = Mixer::default();
        m.push(Side::Agent, &[1; 200]);
        m.push(Side::Far, &[-2; 100]);
        let mut out = Vec::new();
        m.frame(&mut out);
        assert_eq!(out.len(), FRAME * 4);
        let samples: Vec<i16> = out
            .chunks_exact(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(&samples[..4], &[1, -2, 1, -2]);
        // The far side ran out after 100 samples: silence on the right from there.
        assert_eq!(&samples[200..202], &[1, 0]);
        m.push(Side::Far, &[5; MAX_BACKLOG + 100]);
        assert_eq!(m.far.len(), MAX_BACKLOG, "a side running ahead is bounded");
    }

    #[test]
    fn header_and_names() {
        let h = wav_header(32_000);
        assert_eq!(&h[0..4], b"RIFF");
        assert_eq!(u32::from_le_bytes(h[4..8].try_into().unwrap()), 32_036);
        assert_eq!(u16::from_le_bytes(h[22..24].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(h[40..44].try_into().unwrap()), 32_000);
        assert_eq!(file_name("c-0123abcd").as_deref(), Some("c-0123abcd.wav"));
        for bad in ["c-../x", "x-1234", "c-12/34", ""] {
            assert_eq!(file_name(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn a_recording_is_a_valid_wav_while_and_after_it_is_written() {
        let dir = std::env::temp_dir().join(format!("callgate-rec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c-00.wav");
        let _ = std::fs::remove_file(&path);
        let tap = start(path.clone(), ()).unwrap();
        for _ in 0..10 {
            tap.send((Side::Agent, vec![100; FRAME])).await.unwrap();
            tap.send((Side::Far, vec![-100; FRAME])).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(tap);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let bytes = std::fs::read(&path).unwrap();
        let data_len = u32::from_le_bytes(bytes[40..44].try_into().unwrap()) as usize;
        assert_eq!(bytes.len(), 44 + data_len);
        assert!(data_len >= FRAME * 4 * 8, "{data_len}");
        let frames: Vec<(i16, i16)> = bytes[44..]
            .chunks_exact(4)
            .map(|c| {
                (
                    i16::from_le_bytes([c[0], c[1]]),
                    i16::from_le_bytes([c[2], c[3]]),
                )
            })
            .collect();
        let spoken = frames.iter().filter(|f| **f == (100, -100)).count();
        assert!(
            spoken >= FRAME * 8,
            "agent left, far end right: {spoken} frames"
        );
        // Old recordings are swept, fresh ones kept.
        assert_eq!(sweep(&dir, Duration::from_secs(3600)), 0);
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(std::time::SystemTime::now() - Duration::from_secs(7200))
            .unwrap();
        assert_eq!(sweep(&dir, Duration::from_secs(3600)), 1);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
