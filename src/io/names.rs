//! The one place that knows how tensors are named: Hugging Face's LLaMA layout for checkpoints, and the
//! names `bake` gives δ in its activation diff. Every other module asks here instead of formatting names.

/// Where in a decoder layer a method reads its activations and adds its vector, and so which bias carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Site {
    /// The input of `self_attn.o_proj`, `[num_heads * head_dim]`: the heads' outputs (ITI, NL-ITI). A constant
    /// added there is the o_proj bias `W_o · δ`.
    #[default]
    AttentionHeads,
    /// The residual stream after the layer, `[hidden_size]`, where `mlp.down_proj`'s output joins it. A constant
    /// added there is a down_proj bias, as it is.
    Residual,
}

pub const EMBED_TOKENS: &str = "model.embed_tokens.weight";
pub const FINAL_NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";

/// A projection of the attention block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attention {
    Q,
    K,
    V,
    O,
}

impl Attention {
    pub const ALL: [Attention; 4] = [Attention::Q, Attention::K, Attention::V, Attention::O];

    fn module(self) -> &'static str {
        match self {
            Attention::Q => "q_proj",
            Attention::K => "k_proj",
            Attention::V => "v_proj",
            Attention::O => "o_proj",
        }
    }
}

/// A projection of the MLP block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mlp {
    Gate,
    Up,
    Down,
}

impl Mlp {
    pub const ALL: [Mlp; 3] = [Mlp::Gate, Mlp::Up, Mlp::Down];

    fn module(self) -> &'static str {
        match self {
            Mlp::Gate => "gate_proj",
            Mlp::Up => "up_proj",
            Mlp::Down => "down_proj",
        }
    }
}

/// A parameter of a linear layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    Weight,
    Bias,
}

impl Param {
    fn suffix(self) -> &'static str {
        match self {
            Param::Weight => "weight",
            Param::Bias => "bias",
        }
    }
}

/// Names inside decoder layer `.0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layer(pub usize);

impl Layer {
    /// Every tensor of the layer starts with this.
    pub fn prefix(self) -> String {
        format!("model.layers.{}.", self.0)
    }

    pub fn attention(self, proj: Attention, param: Param) -> String {
        format!("{}self_attn.{}.{}", self.prefix(), proj.module(), param.suffix())
    }

    pub fn mlp(self, proj: Mlp, param: Param) -> String {
        format!("{}mlp.{}.{}", self.prefix(), proj.module(), param.suffix())
    }

    pub fn input_norm(self) -> String {
        format!("{}input_layernorm.weight", self.prefix())
    }

    pub fn post_attention_norm(self) -> String {
        format!("{}post_attention_layernorm.weight", self.prefix())
    }

    /// Qwen3's per-head RMSNorm of the queries (`Attention::Q`) or keys (`Attention::K`), before rotary.
    pub fn head_norm(self, proj: Attention) -> String {
        let which = if proj == Attention::Q { "q_norm" } else { "k_norm" };
        format!("{}self_attn.{which}.weight", self.prefix())
    }

    /// The bias that carries a shift at `site`: o_proj's (`W_o · δ`) or down_proj's (δ itself).
    pub fn shift_bias(self, site: Site) -> String {
        match site {
            Site::AttentionHeads => self.attention(Attention::O, Param::Bias),
            Site::Residual => self.mlp(Mlp::Down, Param::Bias),
        }
    }

    /// δ of this layer in `activation_diff.safetensors`.
    pub fn delta(self, site: Site) -> String {
        match site {
            Site::AttentionHeads => format!("layers.{}.self_attn.o_proj.input.delta", self.0),
            Site::Residual => format!("layers.{}.mlp.down_proj.output.delta", self.0),
        }
    }

    /// The module input or output pyvene shifts: the o_proj input, or the down_proj output (the residual
    /// stream's addend).
    pub fn component(self, site: Site) -> String {
        match site {
            Site::AttentionHeads => format!("model.layers[{}].self_attn.o_proj.input", self.0),
            Site::Residual => format!("model.layers[{}].mlp.down_proj.output", self.0),
        }
    }
}

const SITES: [Site; 2] = [Site::AttentionHeads, Site::Residual];

/// The decoder layer a checkpoint tensor belongs to.
pub fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}

/// The layer and site of a δ in `activation_diff.safetensors`.
pub fn delta_layer(name: &str) -> Option<(usize, Site)> {
    let layer: usize = name.strip_prefix("layers.")?.split('.').next()?.parse().ok()?;
    SITES.into_iter().find(|&site| name == Layer(layer).delta(site)).map(|site| (layer, site))
}

/// The layer and site of a pyvene component path (`model.layers[l].self_attn.o_proj.input`).
pub fn component_layer(component: &str) -> Option<(usize, Site)> {
    let layer: usize = component.strip_prefix("model.layers[")?.split(']').next()?.parse().ok()?;
    SITES.into_iter().find(|&site| component == Layer(layer).component(site)).map(|site| (layer, site))
}

/// Whether `name` is the bias of a projection a bake may add: q, k, v, o, gate, up or down of some layer.
pub fn is_added_bias(name: &str) -> bool {
    layer_of(name).is_some_and(|l| {
        let layer = Layer(l);
        Attention::ALL.iter().any(|&p| name == layer.attention(p, Param::Bias))
            || Mlp::ALL.iter().any(|&p| name == layer.mlp(p, Param::Bias))
    })
}

/// Whether `name` is the bias that carries a shift at some site (o_proj's or down_proj's): the one tensor a
/// bake replaces or adds with a value.
pub fn is_shift_bias(name: &str) -> bool {
    layer_of(name).is_some_and(|l| SITES.iter().any(|&site| name == Layer(l).shift_bias(site)))
}

/// Whether `name` is the bias of an attention projection (q, k, v or o) of some layer.
pub fn is_attention_bias(name: &str) -> bool {
    layer_of(name).is_some_and(|l| Attention::ALL.iter().any(|&p| name == Layer(l).attention(p, Param::Bias)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let l = Layer(7);
        assert_eq!(l.attention(Attention::O, Param::Bias), "model.layers.7.self_attn.o_proj.bias");
        assert_eq!(l.mlp(Mlp::Down, Param::Weight), "model.layers.7.mlp.down_proj.weight");
        assert_eq!(layer_of(&l.input_norm()), Some(7));
        for site in SITES {
            assert_eq!(delta_layer(&l.delta(site)), Some((7, site)));
            assert_eq!(component_layer(&l.component(site)), Some((7, site)));
            assert!(is_shift_bias(&l.shift_bias(site)) && is_added_bias(&l.shift_bias(site)));
        }
        assert!(is_added_bias("model.layers.3.mlp.up_proj.bias"));
        assert!(!is_shift_bias("model.layers.3.mlp.up_proj.bias"));
        assert!(is_attention_bias("model.layers.3.self_attn.k_proj.bias"));
        assert!(!is_attention_bias("model.layers.3.mlp.up_proj.bias"));
        assert!(!is_attention_bias("model.layers.3.self_attn.o_proj.weight"));
    }
}
