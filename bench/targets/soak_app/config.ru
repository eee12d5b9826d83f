# The fault soak's Rack app (bench/scenarios/soak.py). Every POST it receives is logged (its id, one line,
# O_APPEND) to SOAK_LOG before anything else happens, so an id that appears twice across the app
# servers' logs is a POST that reached them twice. The client tells it, per request, what to do:
#   X-Id        unique request id; X-Size: response body bytes; X-Ms: sleep before answering
#   X-Body-Len / X-Body-Sha: the request body it must have received whole (else 400)
#   X-Fault     "reset": reset the connection (RST) before answering; "cut": send the head and
#               half the body, then reset. Only on the first sight of the id across all app
#               servers (a marker file in SOAK_MARKS), so an allowed retry can succeed.
# The body is `payload(id, size)`: the client checks it byte for byte. Bodies of 100 kB and more
# go out in 50 kB parts 4 ms apart, so a killed worker can cut one mid-body.
require "digest"
require "socket"

LOG = ENV.fetch("SOAK_LOG")
MARKS = ENV.fetch("SOAK_MARKS")
NAME = ENV.fetch("SOAK_NAME")

def payload(id, size)
  unit = "#{id}."
  (unit * (size / unit.bytesize + 1))[0, size]
end

def first_sight?(id)
  File.open(File.join(MARKS, id), File::WRONLY | File::CREAT | File::EXCL).close
  true
rescue Errno::EEXIST
  false
end

class Parts
  def initialize(body)
    @body = body
  end

  def each
    (0...@body.bytesize).step(50_000).each_with_index do |off, i|
      sleep 0.004 if i > 0
      yield @body.byteslice(off, 50_000)
    end
  end
end

run(lambda do |env|
  id = env["HTTP_X_ID"].to_s
  input = env["rack.input"].read
  File.open(LOG, "a") { |f| f.syswrite("#{id}\n") } if env["REQUEST_METHOD"] == "POST"
  size = env["HTTP_X_SIZE"].to_i
  fault = env["HTTP_X_FAULT"].to_s
  if (fault == "reset" || fault == "cut") && id.match?(/\A[\w.-]+\z/) && first_sight?(id)
    io = env["rack.hijack"].call
    if fault == "cut"
      io.write("HTTP/1.1 200 OK\r\nContent-Length: #{size}\r\nX-Id: #{id}\r\n\r\n" +
               payload(id, size)[0, size / 2])
    end
    io.setsockopt(Socket::SOL_SOCKET, Socket::SO_LINGER, [1, 0].pack("ii"))
    io.close
    return [200, {}, []]
  end
  want_len = env["HTTP_X_BODY_LEN"].to_i
  if input.bytesize != want_len || (want_len > 0 && Digest::SHA256.hexdigest(input) != env["HTTP_X_BODY_SHA"])
    return [400, {"content-type" => "text/plain", "x-id" => id}, ["request body differs\n"]]
  end
  ms = env["HTTP_X_MS"].to_i
  sleep(ms / 1000.0) if ms > 0
  body = payload(id, size)
  headers = {"content-type" => "application/octet-stream", "content-length" => size.to_s,
             "x-id" => id, "x-served-by" => "#{NAME}/#{Process.pid}"}
  [200, headers, size >= 100_000 ? Parts.new(body) : [body]]
end)
