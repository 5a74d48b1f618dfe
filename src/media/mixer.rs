//! An audio mixer for conferences and supervisors, sans-IO: G.711 in and out, 20 ms frames at
//! 8 kHz. Each party hears the sum of the others, clipped to 16 bits, encoded in its own law.
//! A muted or held party contributes nothing. A party can be deaf to some speakers: a
//! supervisor listening is muted, and whispering is heard only by the agent.
//!
//! Call order, every 20 ms: [`Mixer::handle_frame`] for each party's packet received since the
//! last tick (the last one counts), then [`Mixer::mix`]. A party with no frame this tick
//! contributes silence. Nothing here allocates per tick once the parties are added.

/// Samples per 20 ms frame.
pub const FRAME: usize = 160;
/// Parties in one mixer at most.
pub const MAX_PARTIES: usize = 16;

/// A party's G.711 law.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Law {
    /// PCMU.
    Ulaw,
    /// PCMA.
    Alaw,
}

impl Law {
    fn decode(self, b: u8) -> i16 {
        match self {
            Law::Ulaw => super::g711::ulaw_decode(b),
            Law::Alaw => super::g711::alaw_decode(b),
        }
    }

    fn encode(self, s: i16) -> u8 {
        match self {
            Law::Ulaw => super::g711::ulaw_encode(s),
            Law::Alaw => super::g711::alaw_encode(s),
        }
    }
}

/// Why a party was not added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MixerError {
    /// [`MAX_PARTIES`] already.
    #[error("the mixer has its maximum of {MAX_PARTIES} parties")]
    Full,
    /// That id is in already.
    #[error("party {0} is in the mixer already")]
    Duplicate(u32),
}

#[derive(Debug)]
struct Party {
    id: u32,
    law: Law,
    muted: bool,
    /// Speakers this party does not hear.
    deaf_to: Vec<u32>,
    /// This tick's samples, if a frame came.
    samples: [i32; FRAME],
    heard: bool,
    /// What it hears this tick, encoded.
    out: [u8; FRAME],
}

/// One conference's (or monitored call's) mix.
#[derive(Debug, Default)]
pub struct Mixer {
    parties: Vec<Party>,
    sum: Vec<i32>,
}

impl Mixer {
    /// An empty mixer.
    pub fn new() -> Mixer {
        Mixer {
            parties: Vec::new(),
            sum: vec![0; FRAME],
        }
    }

    /// Adds party `id`, speaking and hearing in `law`.
    pub fn add(&mut self, id: u32, law: Law) -> Result<(), MixerError> {
        if self.parties.iter().any(|p| p.id == id) {
            return Err(MixerError::Duplicate(id));
        }
        if self.parties.len() >= MAX_PARTIES {
            return Err(MixerError::Full);
        }
        self.parties.push(Party {
            id,
            law,
            muted: false,
            deaf_to: Vec::new(),
            samples: [0; FRAME],
            heard: false,
            out: [law.encode(0); FRAME],
        });
        Ok(())
    }

    /// Removes party `id` (and it from everyone's deaf list).
    pub fn remove(&mut self, id: u32) {
        self.parties.retain(|p| p.id != id);
        for p in &mut self.parties {
            p.deaf_to.retain(|s| *s != id);
        }
    }

    /// Parties in the mixer.
    pub fn len(&self) -> usize {
        self.parties.len()
    }

    /// Whether nobody is in.
    pub fn is_empty(&self) -> bool {
        self.parties.is_empty()
    }

    /// A muted (or held) party contributes nothing; it still hears.
    pub fn set_muted(&mut self, id: u32, muted: bool) {
        if let Some(p) = self.parties.iter_mut().find(|p| p.id == id) {
            p.muted = muted;
        }
    }

    /// Whether `listener` hears `speaker` (everyone hears everyone else by default).
    pub fn set_hears(&mut self, listener: u32, speaker: u32, hears: bool) {
        if let Some(p) = self.parties.iter_mut().find(|p| p.id == listener) {
            p.deaf_to.retain(|s| *s != speaker);
            if !hears {
                p.deaf_to.push(speaker);
            }
        }
    }

    /// Party `id`'s frame for this tick (G.711 in its law; a short frame is padded with
    /// silence, a long one cut at 20 ms).
    pub fn handle_frame(&mut self, id: u32, payload: &[u8]) {
        let Some(p) = self.parties.iter_mut().find(|p| p.id == id) else {
            return;
        };
        let law = p.law;
        for (i, s) in p.samples.iter_mut().enumerate() {
            *s = payload.get(i).map_or(0, |b| i32::from(law.decode(*b)));
        }
        p.heard = true;
    }

    /// Mixes this tick: each party's frame to send (what it hears), by id. The frames of this
    /// tick are used up.
    pub fn mix(&mut self) -> impl Iterator<Item = (u32, &[u8])> {
        self.sum.iter_mut().for_each(|s| *s = 0);
        for p in self.parties.iter().filter(|p| p.heard && !p.muted) {
            for (acc, s) in self.sum.iter_mut().zip(p.samples.iter()) {
                *acc += s;
            }
        }
        for i in 0..self.parties.len() {
            let mut mix = [0i32; FRAME];
            mix.copy_from_slice(&self.sum);
            let parties = &self.parties;
            let p = &parties[i];
            let speaking = |s: &Party| s.heard && !s.muted;
            if speaking(p) {
                for (m, s) in mix.iter_mut().zip(p.samples.iter()) {
                    *m -= s;
                }
            }
            for speaker in &p.deaf_to {
                let found = parties
                    .iter()
                    .find(|s| s.id == *speaker && s.id != p.id && speaking(s));
                if let Some(s) = found {
                    for (m, v) in mix.iter_mut().zip(s.samples.iter()) {
                        *m -= v;
                    }
                }
            }
            let p = &mut self.parties[i];
            for (o, m) in p.out.iter_mut().zip(mix.iter()) {
                *o = p
                    .law
                    .encode((*m).clamp(i32::from(i16::MIN), i32::from(i16::MAX)) as i16);
            }
        }
        for p in self.parties.iter_mut() {
            p.heard = false;
        }
        self.parties.iter().map(|p| (p.id, &p.out[..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(freq: f64, amp: f64, law: Law, tick: usize) -> Vec<u8> {
        (0..FRAME)
            .map(|i| {
                let t = (tick * FRAME + i) as f64 / 8000.0;
                law.encode(((2.0 * std::f64::consts::PI * freq * t).sin() * amp) as i16)
            })
            .collect()
    }

    /// The power of `freq` in a G.711 frame (Goertzel).
    fn power(frame: &[u8], law: Law, freq: f64) -> f64 {
        let k = 2.0 * (2.0 * std::f64::consts::PI * freq / 8000.0).cos();
        let (mut s1, mut s2) = (0.0, 0.0);
        for b in frame {
            let s0 = f64::from(law.decode(*b)) + k * s1 - s2;
            s2 = s1;
            s1 = s0;
        }
        s1 * s1 + s2 * s2 - k * s1 * s2
    }

    fn heard(m: &mut Mixer) -> Vec<(u32, Vec<u8>)> {
        m.mix().map(|(id, f)| (id, f.to_vec())).collect()
    }

    const A: f64 = 400.0;
    const B: f64 = 1000.0;
    const C: f64 = 2200.0;

    /// Which of the three tones a frame holds (power well above the rest).
    fn tones(frame: &[u8], law: Law) -> Vec<f64> {
        let p: Vec<(f64, f64)> = [A, B, C]
            .iter()
            .map(|f| (*f, power(frame, law, *f)))
            .collect();
        let max = p.iter().map(|x| x.1).fold(0.0, f64::max);
        p.iter()
            .filter(|x| x.1 > max / 100.0 && x.1 > 1e8)
            .map(|x| x.0)
            .collect()
    }

    #[test]
    fn each_party_hears_the_others_and_not_itself() {
        let mut m = Mixer::new();
        m.add(1, Law::Ulaw).unwrap_or_default();
        m.add(2, Law::Ulaw).unwrap_or_default();
        m.add(3, Law::Alaw).unwrap_or_default();
        m.handle_frame(1, &tone(A, 6000.0, Law::Ulaw, 0));
        m.handle_frame(2, &tone(B, 6000.0, Law::Ulaw, 0));
        m.handle_frame(3, &tone(C, 6000.0, Law::Alaw, 0));
        let out = heard(&mut m);
        assert_eq!(tones(&out[0].1, Law::Ulaw), vec![B, C]);
        assert_eq!(tones(&out[1].1, Law::Ulaw), vec![A, C]);
        assert_eq!(tones(&out[2].1, Law::Alaw), vec![A, B], "in its own law");
        // Frames are used up: the next tick without frames is silence for all.
        for (_, f) in heard(&mut m) {
            assert!(tones(&f, Law::Ulaw).is_empty());
        }
    }

    #[test]
    fn muted_parties_add_nothing_and_a_whisper_reaches_the_agent_only() {
        // 1 agent, 2 customer, 3 supervisor.
        let mut m = Mixer::new();
        for id in 1..=3 {
            m.add(id, Law::Ulaw).unwrap_or_default();
        }
        let tick = |m: &mut Mixer| {
            m.handle_frame(1, &tone(A, 6000.0, Law::Ulaw, 0));
            m.handle_frame(2, &tone(B, 6000.0, Law::Ulaw, 0));
            m.handle_frame(3, &tone(C, 6000.0, Law::Ulaw, 0));
            heard(m)
        };
        // Listen: the supervisor is muted; it hears both sides.
        m.set_muted(3, true);
        let out = tick(&mut m);
        assert_eq!(tones(&out[0].1, Law::Ulaw), vec![B]);
        assert_eq!(tones(&out[1].1, Law::Ulaw), vec![A]);
        assert_eq!(tones(&out[2].1, Law::Ulaw), vec![A, B]);
        // Whisper: the supervisor speaks, the customer does not hear it.
        m.set_muted(3, false);
        m.set_hears(2, 3, false);
        let out = tick(&mut m);
        assert_eq!(tones(&out[0].1, Law::Ulaw), vec![B, C]);
        assert_eq!(tones(&out[1].1, Law::Ulaw), vec![A]);
        // Barge: everyone hears everyone.
        m.set_hears(2, 3, true);
        let out = tick(&mut m);
        assert_eq!(tones(&out[1].1, Law::Ulaw), vec![A, C]);
        // A party leaving leaves the others talking.
        m.remove(1);
        let out = tick(&mut m);
        assert_eq!(out.len(), 2);
        assert_eq!(tones(&out[0].1, Law::Ulaw), vec![C]);
    }

    #[test]
    fn loud_sums_clip_instead_of_wrapping_and_bad_input_is_harmless() {
        let mut m = Mixer::new();
        for id in 1..=3 {
            m.add(id, Law::Ulaw).unwrap_or_default();
        }
        // Two parties at full scale in phase: their sum clips at the third party.
        let loud = vec![Law::Ulaw.encode(30_000); FRAME];
        m.handle_frame(1, &loud);
        m.handle_frame(2, &loud);
        m.handle_frame(3, &[]);
        let out = heard(&mut m);
        assert!(
            out[2].1.iter().all(|b| Law::Ulaw.decode(*b) > 30_000),
            "clipped high, not wrapped negative"
        );
        // Short, long and unknown frames.
        m.handle_frame(1, &[0x00; 7]);
        m.handle_frame(2, &[0x00; 4000]);
        m.handle_frame(99, &[0x00; 160]);
        assert_eq!(heard(&mut m).len(), 3);
        assert_eq!(m.add(2, Law::Ulaw), Err(MixerError::Duplicate(2)));
        for id in 4..=MAX_PARTIES as u32 {
            m.add(id, Law::Ulaw).unwrap_or_default();
        }
        assert_eq!(m.add(100, Law::Ulaw), Err(MixerError::Full));
    }
}
