//! llama.cpp's hand-written chat formats (`src/llama-chat.cpp`, commit 0c1e570): the fallback for
//! a template our Jinja engine cannot compile, recognised by `llm_chat_detect_template`'s substring
//! heuristics, and selectable by name. Messages are flattened to (role, text) as llama.cpp's legacy
//! path does.

use super::{ChatError, Message};

/// A built-in format. Names are llama.cpp's (`LLM_CHAT_TEMPLATES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuiltinTemplate {
    Chatml,
    Llama2,
    Llama2Sys,
    Llama2SysBos,
    Llama2SysStrip,
    MistralV1,
    MistralV3,
    MistralV3Tekken,
    MistralV7,
    MistralV7Tekken,
    Phi3,
    Phi4,
    Falcon3,
    Zephyr,
    Monarch,
    Gemma,
    Orion,
    Openchat,
    Vicuna,
    VicunaOrca,
    Deepseek,
    Deepseek2,
    Deepseek3,
    CommandR,
    Llama3,
    Chatglm3,
    Chatglm4,
    Glmedge,
    Minicpm,
}

fn trim(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_ascii_whitespace() || c == '\u{b}')
}

impl BuiltinTemplate {
    /// Every built-in format, in llama.cpp's table order.
    pub const ALL: &'static [BuiltinTemplate] = &[
        BuiltinTemplate::Chatml,
        BuiltinTemplate::Llama2,
        BuiltinTemplate::Llama2Sys,
        BuiltinTemplate::Llama2SysBos,
        BuiltinTemplate::Llama2SysStrip,
        BuiltinTemplate::MistralV1,
        BuiltinTemplate::MistralV3,
        BuiltinTemplate::MistralV3Tekken,
        BuiltinTemplate::MistralV7,
        BuiltinTemplate::MistralV7Tekken,
        BuiltinTemplate::Phi3,
        BuiltinTemplate::Phi4,
        BuiltinTemplate::Falcon3,
        BuiltinTemplate::Zephyr,
        BuiltinTemplate::Monarch,
        BuiltinTemplate::Gemma,
        BuiltinTemplate::Orion,
        BuiltinTemplate::Openchat,
        BuiltinTemplate::Vicuna,
        BuiltinTemplate::VicunaOrca,
        BuiltinTemplate::Deepseek,
        BuiltinTemplate::Deepseek2,
        BuiltinTemplate::Deepseek3,
        BuiltinTemplate::CommandR,
        BuiltinTemplate::Llama3,
        BuiltinTemplate::Chatglm3,
        BuiltinTemplate::Chatglm4,
        BuiltinTemplate::Glmedge,
        BuiltinTemplate::Minicpm,
    ];

    /// llama.cpp's name of the format.
    pub fn name(self) -> &'static str {
        use BuiltinTemplate::*;
        match self {
            Chatml => "chatml",
            Llama2 => "llama2",
            Llama2Sys => "llama2-sys",
            Llama2SysBos => "llama2-sys-bos",
            Llama2SysStrip => "llama2-sys-strip",
            MistralV1 => "mistral-v1",
            MistralV3 => "mistral-v3",
            MistralV3Tekken => "mistral-v3-tekken",
            MistralV7 => "mistral-v7",
            MistralV7Tekken => "mistral-v7-tekken",
            Phi3 => "phi3",
            Phi4 => "phi4",
            Falcon3 => "falcon3",
            Zephyr => "zephyr",
            Monarch => "monarch",
            Gemma => "gemma",
            Orion => "orion",
            Openchat => "openchat",
            Vicuna => "vicuna",
            VicunaOrca => "vicuna-orca",
            Deepseek => "deepseek",
            Deepseek2 => "deepseek2",
            Deepseek3 => "deepseek3",
            CommandR => "command-r",
            Llama3 => "llama3",
            Chatglm3 => "chatglm3",
            Chatglm4 => "chatglm4",
            Glmedge => "glmedge",
            Minicpm => "minicpm",
        }
    }

    /// The format with llama.cpp's name `name`.
    pub fn from_name(name: &str) -> Option<BuiltinTemplate> {
        Self::ALL.iter().copied().find(|b| b.name() == name)
    }

    /// `llm_chat_detect_template`: a name, or the format a Jinja source looks like. `None` when
    /// nothing matches (or llama.cpp's match is a format not ported here).
    pub fn detect(tmpl: &str) -> Option<BuiltinTemplate> {
        use BuiltinTemplate::*;
        if let Some(b) = Self::from_name(tmpl) {
            return Some(b);
        }
        let has = |s: &str| tmpl.contains(s);
        if has("<|im_start|>") {
            return if has("<|im_sep|>") {
                Some(Phi4)
            } else if has("<end_of_utterance>") {
                None // SmolVLM: not ported
            } else {
                Some(Chatml)
            };
        }
        if tmpl.starts_with("mistral") || has("[INST]") {
            if has("[SYSTEM_PROMPT]") {
                return Some(MistralV7);
            }
            if has("' [INST] ' + system_message") || has("[AVAILABLE_TOOLS]") {
                return Some(if has(" [INST]") {
                    MistralV1
                } else if has("\"[INST]\"") {
                    MistralV3Tekken
                } else {
                    MistralV3
                });
            }
            return Some(if has("content.strip()") {
                Llama2SysStrip
            } else if has("bos_token + '[INST]") {
                Llama2SysBos
            } else if has("<<SYS>>") {
                Llama2Sys
            } else {
                Llama2
            });
        }
        if has("<|assistant|>") && has("<|end|>") {
            return Some(Phi3);
        }
        if has("[gMASK]<sop>") {
            return Some(Chatglm4);
        }
        if has("<|assistant|>") && has("<|user|>") {
            if has("<|tool_declare|>") {
                return None; // EXAONE MoE: not ported
            }
            return Some(if has("</s>") { Falcon3 } else { Glmedge });
        }
        if has("<|{{ item['role'] }}|>") && has("<|begin_of_image|>") {
            return Some(Glmedge);
        }
        if has("<|user|>") && has("<|endoftext|>") {
            return Some(Zephyr);
        }
        if has("bos_token + message['role']") {
            return Some(Monarch);
        }
        if has("<start_of_turn>") {
            return Some(Gemma);
        }
        if has("'\\n\\nAssistant: ' + eos_token") {
            return Some(Orion);
        }
        if has("GPT4 Correct ") {
            return Some(Openchat);
        }
        if has("USER: ") && has("ASSISTANT: ") {
            return Some(if has("SYSTEM: ") { VicunaOrca } else { Vicuna });
        }
        if has("### Instruction:") && has("<|EOT|>") {
            return Some(Deepseek);
        }
        if has("<|START_OF_TURN_TOKEN|>") && has("<|USER_TOKEN|>") {
            return Some(CommandR);
        }
        if has("<|start_header_id|>") && has("<|end_header_id|>") {
            return Some(Llama3);
        }
        if has("[gMASK]sop") {
            return Some(Chatglm3);
        }
        if has("<用户>") {
            return Some(Minicpm);
        }
        if has("'Assistant: ' + message['content'] + eos_token") {
            return Some(Deepseek2);
        }
        if has("<｜Assistant｜>") && has("<｜User｜>") && has("<｜end▁of▁sentence｜>") {
            return Some(Deepseek3);
        }
        None
    }

    /// `llm_chat_apply_template` for this format: the prompt for `chat`, ending with the assistant
    /// turn's opening when `add_ass`. Contents are the messages' text (typed parts joined by
    /// newlines).
    ///
    /// Errors: none today; the `Result` leaves room for formats that reject a conversation.
    pub(crate) fn apply(self, chat: &[Message], add_ass: bool) -> Result<String, ChatError> {
        use BuiltinTemplate::*;
        let msgs: Vec<(&str, String)> = chat
            .iter()
            .map(|m| (m.role.as_str(), m.flat_content()))
            .collect();
        let mut ss = String::new();
        match self {
            Chatml => {
                for (role, content) in &msgs {
                    ss += &format!("<|im_start|>{role}\n{content}<|im_end|>\n");
                }
                if add_ass {
                    ss += "<|im_start|>assistant\n";
                }
            }
            MistralV7 | MistralV7Tekken => {
                let sp = if self == MistralV7 { " " } else { "" };
                for (role, content) in &msgs {
                    match *role {
                        "system" => ss += &format!("[SYSTEM_PROMPT]{sp}{content}[/SYSTEM_PROMPT]"),
                        "user" => ss += &format!("[INST]{sp}{content}[/INST]"),
                        _ => ss += &format!("{sp}{content}</s>"),
                    }
                }
            }
            MistralV1 | MistralV3 | MistralV3Tekken => {
                let lead = if self == MistralV1 { " " } else { "" };
                let trail = if self == MistralV3Tekken { "" } else { " " };
                let trim_assistant = self == MistralV3;
                let mut inside = false;
                for (role, content) in &msgs {
                    if !inside {
                        ss += &format!("{lead}[INST]{trail}");
                        inside = true;
                    }
                    match *role {
                        "system" => ss += &format!("{content}\n\n"),
                        "user" => ss += &format!("{content}{lead}[/INST]"),
                        _ => {
                            let c = if trim_assistant {
                                trim(content)
                            } else {
                                content
                            };
                            ss += &format!("{trail}{c}</s>");
                            inside = false;
                        }
                    }
                }
            }
            Llama2 | Llama2Sys | Llama2SysBos | Llama2SysStrip => {
                let system = self != Llama2;
                let bos_inside = self == Llama2SysBos;
                let strip = self == Llama2SysStrip;
                let mut inside = true;
                ss += "[INST] ";
                for (role, content) in &msgs {
                    let content = if strip { trim(content) } else { content };
                    if !inside {
                        inside = true;
                        ss += if bos_inside { "<s>[INST] " } else { "[INST] " };
                    }
                    match *role {
                        "system" if system => ss += &format!("<<SYS>>\n{content}\n<</SYS>>\n\n"),
                        "system" => ss += &format!("{content}\n"),
                        "user" => ss += &format!("{content} [/INST]"),
                        _ => {
                            ss += &format!("{content}</s>");
                            inside = false;
                        }
                    }
                }
            }
            Phi3 => {
                for (role, content) in &msgs {
                    ss += &format!("<|{role}|>\n{content}<|end|>\n");
                }
                if add_ass {
                    ss += "<|assistant|>\n";
                }
            }
            Phi4 => {
                for (role, content) in &msgs {
                    ss += &format!("<|im_start|>{role}<|im_sep|>{content}<|im_end|>");
                }
                if add_ass {
                    ss += "<|im_start|>assistant<|im_sep|>";
                }
            }
            Falcon3 => {
                for (role, content) in &msgs {
                    ss += &format!("<|{role}|>\n{content}\n");
                }
                if add_ass {
                    ss += "<|assistant|>\n";
                }
            }
            Zephyr => {
                for (role, content) in &msgs {
                    ss += &format!("<|{role}|>\n{content}<|endoftext|>\n");
                }
                if add_ass {
                    ss += "<|assistant|>\n";
                }
            }
            Monarch => {
                for (i, (role, content)) in msgs.iter().enumerate() {
                    let bos = if i == 0 { "" } else { "<s>" };
                    ss += &format!("{bos}{role}\n{content}</s>\n");
                }
                if add_ass {
                    ss += "<s>assistant\n";
                }
            }
            Gemma => {
                let mut system = String::new();
                for (role, content) in &msgs {
                    if *role == "system" {
                        system += trim(content);
                        continue;
                    }
                    let role = if *role == "assistant" { "model" } else { role };
                    ss += &format!("<start_of_turn>{role}\n");
                    if !system.is_empty() && role != "model" {
                        ss += &format!("{system}\n\n");
                        system.clear();
                    }
                    ss += &format!("{}<end_of_turn>\n", trim(content));
                }
                if add_ass {
                    ss += "<start_of_turn>model\n";
                }
            }
            Orion => {
                let mut system = String::new();
                for (role, content) in &msgs {
                    match *role {
                        "system" => system += content,
                        "user" => {
                            ss += "Human: ";
                            if !system.is_empty() {
                                ss += &format!("{system}\n\n");
                                system.clear();
                            }
                            ss += &format!("{content}\n\nAssistant: </s>");
                        }
                        _ => ss += &format!("{content}</s>"),
                    }
                }
            }
            Openchat => {
                for (role, content) in &msgs {
                    if *role == "system" {
                        ss += &format!("{content}<|end_of_turn|>");
                    } else {
                        let mut r = role.to_string();
                        if let Some(first) = r.get_mut(0..1) {
                            first.make_ascii_uppercase();
                        }
                        ss += &format!("GPT4 Correct {r}: {content}<|end_of_turn|>");
                    }
                }
                if add_ass {
                    ss += "GPT4 Correct Assistant:";
                }
            }
            Vicuna | VicunaOrca => {
                for (role, content) in &msgs {
                    match *role {
                        "system" if self == VicunaOrca => ss += &format!("SYSTEM: {content}\n"),
                        "system" => ss += &format!("{content}\n\n"),
                        "user" => ss += &format!("USER: {content}\n"),
                        "assistant" => ss += &format!("ASSISTANT: {content}</s>\n"),
                        _ => {}
                    }
                }
                if add_ass {
                    ss += "ASSISTANT:";
                }
            }
            Deepseek => {
                for (role, content) in &msgs {
                    match *role {
                        "system" => ss += content,
                        "user" => ss += &format!("### Instruction:\n{content}\n"),
                        "assistant" => ss += &format!("### Response:\n{content}\n<|EOT|>\n"),
                        _ => {}
                    }
                }
                if add_ass {
                    ss += "### Response:\n";
                }
            }
            CommandR => {
                for (role, content) in &msgs {
                    let tok = match *role {
                        "system" => "<|SYSTEM_TOKEN|>",
                        "user" => "<|USER_TOKEN|>",
                        "assistant" => "<|CHATBOT_TOKEN|>",
                        _ => continue,
                    };
                    ss += &format!(
                        "<|START_OF_TURN_TOKEN|>{tok}{}<|END_OF_TURN_TOKEN|>",
                        trim(content)
                    );
                }
                if add_ass {
                    ss += "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>";
                }
            }
            Llama3 => {
                for (role, content) in &msgs {
                    ss += &format!(
                        "<|start_header_id|>{role}<|end_header_id|>\n\n{}<|eot_id|>",
                        trim(content)
                    );
                }
                if add_ass {
                    ss += "<|start_header_id|>assistant<|end_header_id|>\n\n";
                }
            }
            Chatglm3 => {
                ss += "[gMASK]sop";
                for (role, content) in &msgs {
                    ss += &format!("<|{role}|>\n {content}");
                }
                if add_ass {
                    ss += "<|assistant|>";
                }
            }
            Chatglm4 => {
                ss += "[gMASK]<sop>";
                for (role, content) in &msgs {
                    ss += &format!("<|{role}|>\n{content}");
                }
                if add_ass {
                    ss += "<|assistant|>\n";
                }
            }
            Glmedge => {
                for (role, content) in &msgs {
                    ss += &format!("<|{role}|>\n{content}");
                }
                if add_ass {
                    ss += "<|assistant|>";
                }
            }
            Minicpm => {
                for (role, content) in &msgs {
                    if *role == "user" {
                        ss += &format!("<用户>{}<AI>", trim(content));
                    } else {
                        ss += trim(content);
                    }
                }
            }
            Deepseek2 => {
                for (role, content) in &msgs {
                    match *role {
                        "system" => ss += &format!("{content}\n\n"),
                        "user" => ss += &format!("User: {content}\n\n"),
                        "assistant" => ss += &format!("Assistant: {content}<｜end▁of▁sentence｜>"),
                        _ => {}
                    }
                }
                if add_ass {
                    ss += "Assistant:";
                }
            }
            Deepseek3 => {
                for (role, content) in &msgs {
                    match *role {
                        "system" => ss += &format!("{content}\n\n"),
                        "user" => ss += &format!("<｜User｜>{content}"),
                        "assistant" => {
                            ss += &format!("<｜Assistant｜>{content}<｜end▁of▁sentence｜>")
                        }
                        _ => {}
                    }
                }
                if add_ass {
                    ss += "<｜Assistant｜>";
                }
            }
        }
        Ok(ss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv() -> Vec<Message> {
        let m = |role: &str, content: &str| Message {
            role: role.into(),
            content: content.into(),
            ..Message::default()
        };
        vec![
            m("system", "You are a helpful assistant"),
            m("user", "Hello"),
            m("assistant", "Hi there"),
            m("user", "Who are you"),
            m("assistant", "   I am an assistant   "),
            m("user", "Another question"),
        ]
    }

    /// Expected strings from llama.cpp's `tests/test-chat-template.cpp` (commit 0c1e570).
    #[test]
    fn formats_match_llama_cpp_test_suite() {
        let cases: &[(BuiltinTemplate, &str)] = &[
            (
                BuiltinTemplate::Chatml,
                "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there<|im_end|>\n<|im_start|>user\nWho are you<|im_end|>\n<|im_start|>assistant\n   I am an assistant   <|im_end|>\n<|im_start|>user\nAnother question<|im_end|>\n<|im_start|>assistant\n",
            ),
            (
                BuiltinTemplate::Llama2Sys,
                "[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST]Hi there</s>[INST] Who are you [/INST]   I am an assistant   </s>[INST] Another question [/INST]",
            ),
            (
                BuiltinTemplate::Zephyr,
                "<|system|>\nYou are a helpful assistant<|endoftext|>\n<|user|>\nHello<|endoftext|>\n<|assistant|>\nHi there<|endoftext|>\n<|user|>\nWho are you<|endoftext|>\n<|assistant|>\n   I am an assistant   <|endoftext|>\n<|user|>\nAnother question<|endoftext|>\n<|assistant|>\n",
            ),
            (
                BuiltinTemplate::Gemma,
                "<start_of_turn>user\nYou are a helpful assistant\n\nHello<end_of_turn>\n<start_of_turn>model\nHi there<end_of_turn>\n<start_of_turn>user\nWho are you<end_of_turn>\n<start_of_turn>model\nI am an assistant<end_of_turn>\n<start_of_turn>user\nAnother question<end_of_turn>\n<start_of_turn>model\n",
            ),
            (
                BuiltinTemplate::Llama3,
                "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWho are you<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nI am an assistant<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nAnother question<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
            ),
            (
                BuiltinTemplate::MistralV7,
                "[SYSTEM_PROMPT] You are a helpful assistant[/SYSTEM_PROMPT][INST] Hello[/INST] Hi there</s>[INST] Who are you[/INST]    I am an assistant   </s>[INST] Another question[/INST]",
            ),
            (
                BuiltinTemplate::Phi3,
                "<|system|>\nYou are a helpful assistant<|end|>\n<|user|>\nHello<|end|>\n<|assistant|>\nHi there<|end|>\n<|user|>\nWho are you<|end|>\n<|assistant|>\n   I am an assistant   <|end|>\n<|user|>\nAnother question<|end|>\n<|assistant|>\n",
            ),
            (
                BuiltinTemplate::Llama2,
                "[INST] You are a helpful assistant\nHello [/INST]Hi there</s>[INST] Who are you [/INST]   I am an assistant   </s>[INST] Another question [/INST]",
            ),
            (
                BuiltinTemplate::Monarch,
                "system\nYou are a helpful assistant</s>\n<s>user\nHello</s>\n<s>assistant\nHi there</s>\n<s>user\nWho are you</s>\n<s>assistant\n   I am an assistant   </s>\n<s>user\nAnother question</s>\n<s>assistant\n",
            ),
            (
                BuiltinTemplate::Orion,
                "Human: You are a helpful assistant\n\nHello\n\nAssistant: </s>Hi there</s>Human: Who are you\n\nAssistant: </s>   I am an assistant   </s>Human: Another question\n\nAssistant: </s>",
            ),
            (
                BuiltinTemplate::Openchat,
                "You are a helpful assistant<|end_of_turn|>GPT4 Correct User: Hello<|end_of_turn|>GPT4 Correct Assistant: Hi there<|end_of_turn|>GPT4 Correct User: Who are you<|end_of_turn|>GPT4 Correct Assistant:    I am an assistant   <|end_of_turn|>GPT4 Correct User: Another question<|end_of_turn|>GPT4 Correct Assistant:",
            ),
            (
                BuiltinTemplate::Deepseek,
                "You are a helpful assistant### Instruction:\nHello\n### Response:\nHi there\n<|EOT|>\n### Instruction:\nWho are you\n### Response:\n   I am an assistant   \n<|EOT|>\n### Instruction:\nAnother question\n### Response:\n",
            ),
            (
                BuiltinTemplate::Vicuna,
                "You are a helpful assistant\n\nUSER: Hello\nASSISTANT: Hi there</s>\nUSER: Who are you\nASSISTANT:    I am an assistant   </s>\nUSER: Another question\nASSISTANT:",
            ),
            (
                BuiltinTemplate::VicunaOrca,
                "SYSTEM: You are a helpful assistant\nUSER: Hello\nASSISTANT: Hi there</s>\nUSER: Who are you\nASSISTANT:    I am an assistant   </s>\nUSER: Another question\nASSISTANT:",
            ),
            (
                BuiltinTemplate::CommandR,
                "<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>You are a helpful assistant<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hello<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Hi there<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Who are you<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>I am an assistant<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Another question<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
            ),
            (
                BuiltinTemplate::Chatglm3,
                "[gMASK]sop<|system|>\n You are a helpful assistant<|user|>\n Hello<|assistant|>\n Hi there<|user|>\n Who are you<|assistant|>\n    I am an assistant   <|user|>\n Another question<|assistant|>",
            ),
            (
                BuiltinTemplate::Chatglm4,
                "[gMASK]<sop><|system|>\nYou are a helpful assistant<|user|>\nHello<|assistant|>\nHi there<|user|>\nWho are you<|assistant|>\n   I am an assistant   <|user|>\nAnother question<|assistant|>\n",
            ),
            (
                BuiltinTemplate::Glmedge,
                "<|system|>\nYou are a helpful assistant<|user|>\nHello<|assistant|>\nHi there<|user|>\nWho are you<|assistant|>\n   I am an assistant   <|user|>\nAnother question<|assistant|>",
            ),
            (
                BuiltinTemplate::Minicpm,
                "You are a helpful assistant<用户>Hello<AI>Hi there<用户>Who are you<AI>I am an assistant<用户>Another question<AI>",
            ),
            (
                BuiltinTemplate::Deepseek2,
                "You are a helpful assistant\n\nUser: Hello\n\nAssistant: Hi there<｜end▁of▁sentence｜>User: Who are you\n\nAssistant:    I am an assistant   <｜end▁of▁sentence｜>User: Another question\n\nAssistant:",
            ),
            (
                BuiltinTemplate::MistralV1,
                " [INST] You are a helpful assistant\n\nHello [/INST] Hi there</s> [INST] Who are you [/INST]    I am an assistant   </s> [INST] Another question [/INST]",
            ),
            (
                BuiltinTemplate::MistralV3,
                "[INST] You are a helpful assistant\n\nHello[/INST] Hi there</s>[INST] Who are you[/INST] I am an assistant</s>[INST] Another question[/INST]",
            ),
            (
                BuiltinTemplate::MistralV3Tekken,
                "[INST]You are a helpful assistant\n\nHello[/INST]Hi there</s>[INST]Who are you[/INST]   I am an assistant   </s>[INST]Another question[/INST]",
            ),
            (
                BuiltinTemplate::Phi4,
                "<|im_start|>system<|im_sep|>You are a helpful assistant<|im_end|><|im_start|>user<|im_sep|>Hello<|im_end|><|im_start|>assistant<|im_sep|>Hi there<|im_end|><|im_start|>user<|im_sep|>Who are you<|im_end|><|im_start|>assistant<|im_sep|>   I am an assistant   <|im_end|><|im_start|>user<|im_sep|>Another question<|im_end|><|im_start|>assistant<|im_sep|>",
            ),
        ];
        for (tmpl, expected) in cases {
            assert_eq!(
                &tmpl.apply(&conv(), true).unwrap(),
                expected,
                "{}",
                tmpl.name()
            );
        }
    }

    #[test]
    fn detection_follows_llama_cpp() {
        assert_eq!(
            BuiltinTemplate::detect("llama3"),
            Some(BuiltinTemplate::Llama3)
        );
        assert_eq!(
            BuiltinTemplate::detect("{{ '<|im_start|>' + m.role }}"),
            Some(BuiltinTemplate::Chatml)
        );
        assert_eq!(
            BuiltinTemplate::detect("{{ '[SYSTEM_PROMPT]' }}{{ '[INST]' }}"),
            Some(BuiltinTemplate::MistralV7)
        );
        assert_eq!(
            BuiltinTemplate::detect("<<SYS>> {{ '[INST]' }}"),
            Some(BuiltinTemplate::Llama2Sys)
        );
        assert_eq!(
            BuiltinTemplate::detect("{{ '<start_of_turn>' }}"),
            Some(BuiltinTemplate::Gemma)
        );
        assert_eq!(BuiltinTemplate::detect("plain text"), None);
    }
}
