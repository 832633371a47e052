// Writing Prometheus' text exposition format (version 0.0.4). Private to the server's metrics.
#ifndef MQA_SERVER_METRICS_TEXT_H_
#define MQA_SERVER_METRICS_TEXT_H_

#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>

namespace mqa::server {

// Appends lines of the text exposition format. Values are integers or finite doubles. Label values are fixed
// words, device names ("cpu", "cuda:N") or values passed through LabelValue (model names).
class Writer {
 public:
  void Header(const char* name, const char* type, const char* help) {
    out_ += "# HELP ";
    out_ += name;
    out_ += ' ';
    out_ += help;
    out_ += "\n# TYPE ";
    out_ += name;
    out_ += ' ';
    out_ += type;
    out_ += '\n';
  }
  void Sample(const std::string& name, const std::string& labels, uint64_t value) {
    Line(name, labels, std::to_string(value));
  }
  void Sample(const std::string& name, const std::string& labels, int64_t value) {
    Line(name, labels, std::to_string(value));
  }
  void SampleDouble(const std::string& name, const std::string& labels, double value) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%.17g", value);  // round-trips: a scrape loses no precision
    Line(name, labels, buf);
  }
  // Scalars for the common unlabelled case.
  void Gauge(const char* name, const char* help, int64_t value) {
    Header(name, "gauge", help);
    Sample(name, "", value);
  }
  void Counter(const char* name, const char* help, uint64_t value) {
    Header(name, "counter", help);
    Sample(name, "", value);
  }
  std::string Take() { return std::move(out_); }

 private:
  void Line(const std::string& name, const std::string& labels, const std::string& value) {
    out_ += name;
    if (!labels.empty()) {
      out_ += '{';
      out_ += labels;
      out_ += '}';
    }
    out_ += ' ';
    out_ += value;
    out_ += '\n';
  }

  std::string out_;
};

// A label value as the format wants it: backslash, double quote and newline escaped.
inline std::string LabelValue(const std::string& v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c == '\\' || c == '"') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  return out;
}

inline std::string Le(double bound) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "le=\"%g\"", bound);
  return buf;
}

}  // namespace mqa::server

#endif  // MQA_SERVER_METRICS_TEXT_H_
