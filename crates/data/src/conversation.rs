//! Conversation templates, exactly as the reference's `llava/conversation.py` (`conv_templates`
//! keys, system messages, roles, separators, few-shot messages) and its `get_prompt`.

/// How turns are joined (`SeparatorStyle` in the reference).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SepStyle {
    /// `system + sep`, then `role: text + sep`.
    Single,
    /// `system + sep`, then `role: text + (sep | sep2)` alternating.
    Two,
    /// ChatML: `system + sep`, then `role + text + sep`.
    Mpt,
    /// `[INST] … [/INST] answer </s><s>[INST] …`.
    Llama2,
    /// No roles: `text + sep` (training strings only).
    Plain,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    pub system: String,
    pub roles: [String; 2],
    /// `(role, text)`; `None` text = the turn to be generated.
    pub messages: Vec<(String, Option<String>)>,
    pub offset: usize,
    pub sep_style: SepStyle,
    pub sep: String,
    pub sep2: Option<String>,
    pub version: String,
}

const SYS_HUMAN: &str = "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions.";
const SYS_USER: &str = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.";
const SYS_MMTAG: &str = "A chat between a curious user and an artificial intelligence assistant. The assistant is able to understand the visual content that the user provides, and assist the user with a variety of tasks using natural language.The visual content will be provided with the following format: <Image>visual content</Image>.";
const SYS_LLAMA2: &str = "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a question does not make any sense, or is not factually coherent, explain why instead of answering something not correct. If you don't know the answer to a question, please don't share false information.";
const SYS_LLAVA_LLAMA2: &str = "You are a helpful language and vision assistant. You are able to understand the visual content that the user provides, and assist the user with a variety of tasks using natural language.";
const SYS_MPT: &str = "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest answers.";
const SYS_CHATML_DIRECT: &str = "<|im_start|>system\nAnswer the questions.";

const FEW_SHOT_Q: &str = "What are the key differences between renewable and non-renewable energy sources?";
const FEW_SHOT_A: &str = "Renewable energy sources are those that can be replenished naturally in a relatively short amount of time, such as solar, wind, hydro, geothermal, and biomass. Non-renewable energy sources, on the other hand, are finite and will eventually be depleted, such as coal, oil, and natural gas. Here are some key differences between renewable and non-renewable energy sources:\n1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable energy sources are finite and will eventually run out.\n2. Environmental impact: Renewable energy sources have a much lower environmental impact than non-renewable sources, which can lead to air and water pollution, greenhouse gas emissions, and other negative effects.\n3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically have lower operational costs than non-renewable sources.\n4. Reliability: Renewable energy sources are often more reliable and can be used in more remote locations than non-renewable sources.\n5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different situations and needs, while non-renewable sources are more rigid and inflexible.\n6. Sustainability: Renewable energy sources are more sustainable over the long term, while non-renewable sources are not, and their depletion can lead to economic and social instability.\n";

/// The reference's `conv_templates` keys.
pub const TEMPLATE_NAMES: &[&str] = &[
    "default",
    "v0",
    "v1",
    "vicuna_v1",
    "llama_2",
    "mistral_instruct",
    "chatml_direct",
    "mistral_direct",
    "plain",
    "v0_plain",
    "llava_v0",
    "v0_mmtag",
    "llava_v1",
    "v1_mmtag",
    "llava_llama_2",
    "mpt",
];

fn conv(system: &str, roles: [&str; 2], style: SepStyle, sep: &str, sep2: Option<&str>, version: &str) -> Conversation {
    Conversation {
        system: system.to_string(),
        roles: roles.map(String::from),
        messages: Vec::new(),
        offset: 0,
        sep_style: style,
        sep: sep.to_string(),
        sep2: sep2.map(String::from),
        version: version.to_string(),
    }
}

/// The template registered under `name` in the reference, or `None`.
pub fn conv_template(name: &str) -> Option<Conversation> {
    use SepStyle::*;
    let c = match name {
        "default" | "v0" => {
            let mut c = conv(SYS_HUMAN, ["Human", "Assistant"], Single, "###", None, "Unknown");
            c.messages = vec![("Human".into(), Some(FEW_SHOT_Q.into())), ("Assistant".into(), Some(FEW_SHOT_A.into()))];
            c.offset = 2;
            c
        }
        "v1" | "vicuna_v1" => conv(SYS_USER, ["USER", "ASSISTANT"], Two, " ", Some("</s>"), "v1"),
        "llama_2" => conv(SYS_LLAMA2, ["USER", "ASSISTANT"], Llama2, "<s>", Some("</s>"), "llama_v2"),
        "mistral_instruct" => conv("", ["USER", "ASSISTANT"], Llama2, "", Some("</s>"), "llama_v2"),
        "chatml_direct" | "mistral_direct" => {
            conv(SYS_CHATML_DIRECT, ["<|im_start|>user\n", "<|im_start|>assistant\n"], Mpt, "<|im_end|>", None, "mpt")
        }
        "plain" | "v0_plain" => conv("", ["", ""], Plain, "\n", None, "Unknown"),
        "llava_v0" => conv(SYS_HUMAN, ["Human", "Assistant"], Single, "###", None, "Unknown"),
        "v0_mmtag" => conv(SYS_MMTAG, ["Human", "Assistant"], Single, "###", None, "v0_mmtag"),
        "llava_v1" => conv(SYS_HUMAN, ["USER", "ASSISTANT"], Two, " ", Some("</s>"), "v1"),
        "v1_mmtag" => conv(SYS_MMTAG, ["USER", "ASSISTANT"], Two, " ", Some("</s>"), "v1_mmtag"),
        "llava_llama_2" => conv(SYS_LLAVA_LLAMA2, ["USER", "ASSISTANT"], Llama2, "<s>", Some("</s>"), "llama_v2"),
        "mpt" => conv(SYS_MPT, ["<|im_start|>user\n", "<|im_start|>assistant\n"], Mpt, "<|im_end|>", None, "mpt"),
        _ => return None,
    };
    Some(c)
}

impl Conversation {
    pub fn append_message(&mut self, role: &str, message: Option<&str>) {
        self.messages.push((role.to_string(), message.map(String::from)));
    }

    /// The prompt string, as the reference's `get_prompt` (text messages).
    pub fn get_prompt(&self) -> String {
        let msgs = &self.messages;
        match self.sep_style {
            SepStyle::Single => {
                let mut ret = format!("{}{}", self.system, self.sep);
                for (role, m) in msgs {
                    match m {
                        Some(m) if !m.is_empty() => ret += &format!("{role}: {m}{}", self.sep),
                        _ => ret += &format!("{role}:"),
                    }
                }
                ret
            }
            SepStyle::Two => {
                let seps = [self.sep.as_str(), self.sep2.as_deref().unwrap_or("")];
                let mut ret = format!("{}{}", self.system, seps[0]);
                for (i, (role, m)) in msgs.iter().enumerate() {
                    match m {
                        Some(m) if !m.is_empty() => ret += &format!("{role}: {m}{}", seps[i % 2]),
                        _ => ret += &format!("{role}:"),
                    }
                }
                ret
            }
            SepStyle::Mpt => {
                let mut ret = format!("{}{}", self.system, self.sep);
                for (role, m) in msgs {
                    match m {
                        Some(m) if !m.is_empty() => ret += &format!("{role}{m}{}", self.sep),
                        _ => ret += role,
                    }
                }
                ret
            }
            SepStyle::Llama2 => {
                let mut ret = String::new();
                for (i, (_, m)) in msgs.iter().enumerate() {
                    let Some(m) = m.as_deref().filter(|m| !m.is_empty()) else { continue };
                    let mut m = m.to_string();
                    if i == 0 && !self.system.is_empty() {
                        m = format!("<<SYS>>\n{}\n<</SYS>>\n\n{m}", self.system);
                    }
                    if i % 2 == 0 {
                        ret += &format!("{}[INST] {m} [/INST]", self.sep);
                    } else {
                        ret += &format!(" {m} {}", self.sep2.as_deref().unwrap_or(""));
                    }
                }
                // Python's `str.lstrip(sep)` strips any of sep's *characters*.
                ret.trim_start_matches(|c| self.sep.contains(c)).to_string()
            }
            SepStyle::Plain => {
                let seps = [self.sep.as_str(), self.sep2.as_deref().unwrap_or("")];
                let mut ret = self.system.clone();
                for (i, (_, m)) in msgs.iter().enumerate() {
                    if let Some(m) = m.as_deref().filter(|m| !m.is_empty()) {
                        ret += m;
                        ret += seps[i % 2];
                    }
                }
                ret
            }
        }
    }

    /// The string after which generation should stop (`sep` for SINGLE, else `sep2`), as the
    /// reference's keyword stopping criterion.
    pub fn stop_str(&self) -> Option<&str> {
        match self.sep_style {
            SepStyle::Single | SepStyle::Plain | SepStyle::Mpt => Some(self.sep.as_str()).filter(|s| !s.is_empty()),
            SepStyle::Two | SepStyle::Llama2 => self.sep2.as_deref(),
        }
    }
}

/// The template the reference CLI picks for a model name (`cli.py` / `run_llava.py`).
pub fn template_for_model_name(name: &str) -> &'static str {
    let n = name.to_lowercase();
    if n.contains("llama-2") {
        "llava_llama_2"
    } else if n.contains("mistral") {
        "mistral_instruct"
    } else if n.contains("v1.6-34b") {
        "chatml_direct"
    } else if n.contains("v1") {
        "llava_v1"
    } else if n.contains("mpt") {
        "mpt"
    } else {
        "llava_v0"
    }
}
