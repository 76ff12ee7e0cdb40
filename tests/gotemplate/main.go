// Command gotemplate renders an Ollama TEMPLATE with Go's own text/template,
// filling it the way Ollama's server does for a /api/chat request.
//
// Usage:
//
//	gotemplate TEMPLATE_FILE < request.json
//
// request.json holds {"messages": [...], "tools": [...], "think": false} in
// the shape of Ollama's /api/chat body. The rendered prompt is written to
// stdout byte for byte (no trailing newline is added).
//
// What it reproduces from Ollama (template/template.go, server/routes.go):
//   - roles are lower-cased when the request is decoded;
//   - the template is parsed with missingkey=zero and the "json" function;
//   - messages are collated: consecutive messages of the same role are merged
//     with "\n\n" (tool messages never are), and .System is every system
//     message's content joined with "\n\n" (system messages also stay in
//     .Messages);
//   - the template is executed once with System, Messages, Tools, Response
//     (always ""), Think, ThinkLevel and IsThinkSet.
//
// Templates that do not use .Messages (Ollama's legacy .Prompt/.Response
// path) are refused: lacd never registers one. Context-window truncation
// (server/prompt.go) is not reproduced either: it only drops whole leading
// messages, which does not change how the kept ones render.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
	"time"
)

// jsonString is the String() used for maps and tool lists inside templates.
func jsonString(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

type arguments map[string]any

func (a arguments) String() string {
	if a == nil {
		return "{}"
	}
	return jsonString(map[string]any(a))
}

type toolCallFunction struct {
	Index     int       `json:"index"`
	Name      string    `json:"name"`
	Arguments arguments `json:"arguments"`
}

type toolCall struct {
	ID       string           `json:"id"`
	Function toolCallFunction `json:"function"`
}

type message struct {
	Role       string     `json:"role"`
	Content    string     `json:"content"`
	Thinking   string     `json:"thinking"`
	Images     []string   `json:"images"`
	ToolCalls  []toolCall `json:"tool_calls"`
	ToolName   string     `json:"tool_name"`
	ToolCallID string     `json:"tool_call_id"`
}

type properties map[string]any

func (p properties) String() string {
	if p == nil {
		return "{}"
	}
	return jsonString(map[string]any(p))
}

type toolParameters struct {
	Type       string     `json:"type"`
	Required   []string   `json:"required,omitempty"`
	Properties properties `json:"properties"`
}

type toolFunction struct {
	Name        string         `json:"name"`
	Description string         `json:"description"`
	Parameters  toolParameters `json:"parameters"`
}

type tool struct {
	Type     string       `json:"type"`
	Function toolFunction `json:"function"`
}

func (t tool) String() string { return jsonString(t) }

type tools []tool

func (t tools) String() string { return jsonString([]tool(t)) }

type request struct {
	Messages []message `json:"messages"`
	Tools    tools     `json:"tools"`
	Think    bool      `json:"think"`
}

var funcs = template.FuncMap{
	"json":          jsonString,
	"currentDate":   func(...string) string { return time.Now().Format("2006-01-02") },
	"yesterdayDate": func(...string) string { return time.Now().AddDate(0, 0, -1).Format("2006-01-02") },
}

// collate merges consecutive same-role messages (never tool ones) and joins
// the system messages, as Ollama does before executing a template.
func collate(msgs []message) (string, []*message) {
	var system []string
	var out []*message
	for i := range msgs {
		msgs[i].Role = strings.ToLower(msgs[i].Role)
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if n := len(out); n > 0 && out[n-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			out[n-1].Content += "\n\n" + msgs[i].Content
		} else {
			out = append(out, &msgs[i])
		}
	}
	return strings.Join(system, "\n\n"), out
}

// identifiers lists the field and variable names a parse tree refers to.
func identifiers(n parse.Node) []string {
	switch n := n.(type) {
	case *parse.ListNode:
		var names []string
		if n == nil {
			return nil
		}
		for _, c := range n.Nodes {
			names = append(names, identifiers(c)...)
		}
		return names
	case *parse.ActionNode:
		return identifiers(n.Pipe)
	case *parse.TemplateNode:
		return identifiers(n.Pipe)
	case *parse.IfNode:
		return identifiers(&n.BranchNode)
	case *parse.RangeNode:
		return identifiers(&n.BranchNode)
	case *parse.WithNode:
		return identifiers(&n.BranchNode)
	case *parse.BranchNode:
		names := identifiers(n.Pipe)
		names = append(names, identifiers(n.List)...)
		if n.ElseList != nil {
			names = append(names, identifiers(n.ElseList)...)
		}
		return names
	case *parse.PipeNode:
		var names []string
		if n == nil {
			return nil
		}
		for _, c := range n.Cmds {
			for _, a := range c.Args {
				names = append(names, identifiers(a)...)
			}
		}
		return names
	case *parse.FieldNode:
		return n.Ident
	case *parse.VariableNode:
		return n.Ident
	}
	return nil
}

func usesMessages(t *template.Template) bool {
	for _, tt := range t.Templates() {
		for _, name := range identifiers(tt.Root) {
			if strings.ToLower(name) == "messages" {
				return true
			}
		}
	}
	return false
}

func run(templatePath string, in io.Reader, out io.Writer) error {
	raw, err := os.ReadFile(templatePath)
	if err != nil {
		return err
	}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(string(raw))
	if err != nil {
		return fmt.Errorf("parse template: %w", err)
	}
	if !usesMessages(tmpl) {
		return fmt.Errorf("template does not use .Messages; legacy .Prompt/.Response templates are not supported")
	}
	var req request
	dec := json.NewDecoder(in)
	if err := dec.Decode(&req); err != nil {
		return fmt.Errorf("decode request: %w", err)
	}
	system, msgs := collate(req.Messages)
	return tmpl.Execute(out, map[string]any{
		"System":     system,
		"Messages":   msgs,
		"Tools":      req.Tools,
		"Response":   "",
		"Think":      req.Think,
		"ThinkLevel": "",
		"IsThinkSet": false,
	})
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: gotemplate TEMPLATE_FILE < request.json")
		os.Exit(2)
	}
	if err := run(os.Args[1], os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "gotemplate:", err)
		os.Exit(1)
	}
}
